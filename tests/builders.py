"""Test-only builders: a tiny VAE and a tiny BERT-layout text encoder, so the latent-space and
T5/MiniLM-style paths run without a hub, in seconds."""

from __future__ import annotations

from pathlib import Path

import torch


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
