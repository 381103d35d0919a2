"""bitsandbytes' NF4 on the chat base: its configuration and its CPU quirk, in one place."""

from __future__ import annotations

import torch
from transformers import BitsAndBytesConfig


def nf4_config(device: str) -> BitsAndBytesConfig:
    """QLoRA's storage format: NF4 weights, double-quantised scales."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if device == "cuda" else torch.float32,
    )


def disable_cpu_weight_packing(model: torch.nn.Module) -> None:
    """bitsandbytes' CPU fast path (where the CPU has AVX512-BF16) repacks the 4-bit weights after an
    eval-mode, no-grad forward and multiplies in bfloat16, with no autograd kernel. Serving: the base
    would answer differently from the one its stacks were trained on, and from machine to machine,
    and a batch's rows would no longer match their requests alone. Training: the gradient through
    the base would be silently lost. Keep float32 compute, as the quantisation config asks."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
