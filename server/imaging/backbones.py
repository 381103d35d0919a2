"""Diffusion transformer backbones (DiT, PixArt) loaded through diffusers, with their conditioning.

A backbone folder has the diffusers pipeline layout: `transformer/`, `scheduler/` and, for latent
models, `vae/`. Pixel-space models (the embedded digit zoo) have no VAE. PixArt's prompt encoder is
its own manifest entry: the packaged MiniLM for the zoo, T5 for users' PixArt checkpoints.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTTransformer2DModel, PixArtTransformer2DModel

from server.imaging.ilf import LoadedILF, load_ilf
from server.manifest import ArtifactResolver, ILFArtifact, ImageModel, TextEncoder
from server.artifacts import ArtifactError, own_memory

log = logging.getLogger(__name__)


class PromptEncoder:
    """Token states + attention mask for prompts: what PixArt's cross-attention reads."""

    def __init__(self, spec: TextEncoder, folder: Path, device: str, dtype: torch.dtype):
        from transformers import AutoModel, AutoTokenizer, T5EncoderModel

        # A full PixArt folder keeps the encoder in text_encoder/ and tokenizer/; the zoo's is flat.
        nested = (folder / "text_encoder").is_dir()
        model_dir = folder / "text_encoder" if nested else folder
        tokenizer_dir = folder / "tokenizer" if nested else folder
        model_cls = T5EncoderModel if spec.kind == "t5" else AutoModel
        extra = {} if spec.kind == "t5" else {"add_pooling_layer": False}  # token states only
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        self.model = model_cls.from_pretrained(model_dir, dtype=dtype, use_safetensors=True, local_files_only=True,
                                               **extra)
        own_memory(self.model.to(device).eval().requires_grad_(False))
        self.max_length = spec.max_length
        self.device = device
        self.width = self.model.config.hidden_size if spec.kind != "t5" else self.model.config.d_model

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(
            prompts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        ).to(self.device)
        states = self.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        return states, tokens.attention_mask


@dataclass
class ImageBackbone:
    """A loaded, frozen diffusion transformer and what it needs to turn noise into pixels."""

    spec: ImageModel
    transformer: torch.nn.Module
    scheduler_config: dict
    vae: AutoencoderKL | None
    prompt_encoder: PromptEncoder | None
    device: str
    dtype: torch.dtype
    ilf: LoadedILF | None = None
    _empty_prompt: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def num_blocks(self) -> int:
        return len(self.transformer.transformer_blocks)

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels

    @property
    def vae_scale_factor(self) -> int:
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def stride(self) -> int:
        """Image sides must be a multiple of this (latent downsampling x patch size)."""
        return self.vae_scale_factor * self.transformer.config.patch_size

    @property
    def native_size(self) -> int:
        return self.transformer.config.sample_size * self.vae_scale_factor

    @property
    def num_classes(self) -> int | None:
        return self.transformer.config.num_embeds_ada_norm if self.spec.kind == "dit" else None

    @property
    def square_only(self) -> bool:
        return self.spec.kind == "dit"  # DiT's unpatchify assumes a square token grid

    def class_names(self) -> list[str]:
        if self.spec.labels is not None:
            return list(self.spec.labels)
        return [str(i) for i in range(self.num_classes or 0)]

    def conditioning(self, conditions: list, guided: bool) -> dict:
        """Model kwargs for a batch, with the unconditional half first when guidance is on."""
        if self.spec.kind == "dit":
            labels = torch.tensor(conditions, dtype=torch.long, device=self.device)
            if guided:
                null = torch.full_like(labels, self.num_classes)  # the extra CFG row of the label table
                labels = torch.cat([null, labels])
            return {"class_labels": labels}
        states, mask = self.prompt_encoder.encode(conditions)
        if guided:
            if self._empty_prompt is None:
                self._empty_prompt = self.prompt_encoder.encode([""])
            empty_states, empty_mask = self._empty_prompt
            n = len(conditions)
            states = torch.cat([empty_states.expand(n, -1, -1), states])
            mask = torch.cat([empty_mask.expand(n, -1), mask])
        return {"encoder_hidden_states": states.to(self.dtype), "encoder_attention_mask": mask}

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """The transformer's output in its scheduler's prediction type (epsilon for DiT-XL/2)."""
        timestep = t.expand(x.shape[0]).to(self.device)
        kwargs = dict(cond)
        if self.spec.kind == "pixart":
            kwargs["added_cond_kwargs"] = self._size_conditions(x)
        out = self.transformer(x.to(self.dtype), timestep=timestep, return_dict=False, **kwargs)[0]
        if out.shape[1] == 2 * self.latent_channels:  # learned-sigma models: keep the prediction half
            out = out[:, : self.latent_channels]
        return out.float()

    def _size_conditions(self, x: torch.Tensor) -> dict:
        if not self.transformer.use_additional_conditions:
            return {"resolution": None, "aspect_ratio": None}
        h, w = x.shape[-2] * self.vae_scale_factor, x.shape[-1] * self.vae_scale_factor
        batch = x.shape[0]
        resolution = torch.tensor([[h, w]], dtype=self.dtype, device=self.device).repeat(batch, 1)
        aspect = torch.tensor([[h / w]], dtype=self.dtype, device=self.device).repeat(batch, 1)
        return {"resolution": resolution, "aspect_ratio": aspect}

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (or pixels) to images in [0, 1]."""
        if self.vae is not None:
            latents = latents / self.vae.config.scaling_factor
            latents = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
        return ((latents.float().clamp(-1, 1) + 1) / 2).cpu()


def load_image_backbone(spec: ImageModel, resolver: ArtifactResolver, device: str) -> ImageBackbone:
    """Verify the model's files against the manifest, then load them with diffusers' own loaders."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    folder = resolver.source(spec.source)
    transformer_cls = DiTTransformer2DModel if spec.kind == "dit" else PixArtTransformer2DModel
    common = dict(use_safetensors=True, local_files_only=True)
    try:
        transformer = transformer_cls.from_pretrained(folder, subfolder="transformer", torch_dtype=dtype, **common)
        scheduler_config = dict(DDIMScheduler.load_config(folder, subfolder="scheduler", local_files_only=True))
    except (OSError, ValueError, EnvironmentError) as exc:
        raise ArtifactError(folder, f"cannot load the {spec.kind} backbone: {exc}") from exc
    own_memory(transformer.to(device).eval().requires_grad_(False))

    vae = None
    if (folder / "vae").is_dir():
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32, **common)
        own_memory(vae.to(device).eval().requires_grad_(False))

    prompt_encoder = None
    if spec.text_encoder is not None:
        encoder_folder = resolver.source(spec.text_encoder.source)
        prompt_encoder = PromptEncoder(spec.text_encoder, encoder_folder, device, dtype)
        expected = transformer.config.caption_channels
        if prompt_encoder.width != expected:
            raise ArtifactError(
                encoder_folder,
                f"text encoder width {prompt_encoder.width} does not match {spec.name}'s caption_channels {expected}",
            )

    backbone = ImageBackbone(spec, transformer, scheduler_config, vae, prompt_encoder, device, dtype)
    if spec.ilf is not None:
        backbone.ilf = load_ilf_for(backbone, spec.ilf, resolver)
    if spec.labels is not None and len(spec.labels) != backbone.num_classes:
        raise ArtifactError(folder, f"manifest lists {len(spec.labels)} labels, the model has {backbone.num_classes} classes")
    if spec.placeholder:
        log.warning("!!! image model %r is an UNTRAINED PLACEHOLDER: its images are noise !!!", spec.name)
    return backbone


def load_ilf_for(backbone: ImageBackbone, artifact: ILFArtifact, resolver: ArtifactResolver) -> LoadedILF:
    """The backbone's ILF module, refused (naming the file) unless it was trained for this backbone
    and for the steps the manifest says."""
    path = resolver.artifact(artifact)
    ilf = load_ilf(path, backbone.transformer, backbone.name)
    if ilf.config.steps != artifact.steps:
        raise ArtifactError(path, f"manifest says {artifact.steps} steps, the module was trained for {ilf.config.steps}")
    return ilf
