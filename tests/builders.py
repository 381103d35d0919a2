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


# The architectures of users' chat models the same loading code serves (TinyLlama is a Llama).
CAUSAL_LM_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3")


def build_causal_lm(folder: Path, architecture: str, hidden: int = 64, layers: int = 2, seed: int = 0) -> None:
    """A tiny random causal LM of one of CAUSAL_LM_ARCHITECTURES in transformers' own layout, with a
    byte-level BPE tokenizer and a chat template; every projection a multiple of 32 (bitsandbytes)."""
    import transformers

    from training.zoo.language import build_chat_tokenizer

    corpus = ["Hello! How can I help you today? Add 3 and 4 to get 7.", "The cat sat on the warm mat."] * 20
    vocab = (build_chat_tokenizer(folder, corpus) + 31) // 32 * 32
    config_class, model_class = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"), "gemma": ("GemmaConfig", "GemmaForCausalLM"),
        "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"), "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
    }[architecture]
    config = getattr(transformers, config_class)(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=architecture.startswith("gemma"),
        # Gemma 3's mix: local layers attend over a sliding window (short here, so prompts pass it)
        **({"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"] * (layers // 2) +
            ["sliding_attention"] * (layers % 2)} if architecture == "gemma3" else {}),
    )
    torch.manual_seed(seed)
    getattr(transformers, model_class)(config).save_pretrained(folder)


def write_llama_gguf(folder: Path, path: Path) -> None:
    """The Llama of a transformers folder (build_causal_lm) as a float32 GGUF file, written the way
    llama.cpp's converter writes one: its tensor names, q/k rows permuted, the byte-level BPE
    vocabulary and merges, the special token ids and the chat template as metadata."""
    import json

    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    spec = json.loads((folder / "tokenizer.json").read_text())["model"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    tokens = [None] * config.vocab_size
    for token, index in spec["vocab"].items():
        tokens[index] = token
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)])
    writer.add_token_types([3 if t in special else (5 if t is None else 1) for t in tokens])  # 5: unused
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in spec["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(tokenizer.chat_template)

    def permute(w: torch.Tensor, heads: int) -> torch.Tensor:  # llama.cpp's rotary layout for q and k
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, tensor in load_file(folder / "model.safetensors").items():
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        elif name == "lm_head.weight":
            gguf_name = "output.weight"
        else:
            _, _, layer, module = name.removesuffix(".weight").split(".", 3)
            gguf_name = f"blk.{layer}.{names[module]}.weight"
            if module == "self_attn.q_proj":
                tensor = permute(tensor, config.num_attention_heads)
            elif module == "self_attn.k_proj":
                tensor = permute(tensor, config.num_key_value_heads)
        writer.add_tensor(gguf_name, tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
