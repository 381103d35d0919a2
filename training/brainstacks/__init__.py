"""Brainstacks training (arXiv 2604.01152): MoE-LoRA stacks over the frozen 4-bit zoo-lm."""
