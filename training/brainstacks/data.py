"""Examples of the generated world, or a user's conversations, as token batches: the loss counts
the assistant's reply only."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from training.data.chat_jsonl import Conversation, DomainExample, encode_conversation
from training.data.world import Example

IGNORE = -100


@dataclass
class Batch:
    input_ids: torch.Tensor  # [batch, length], right-padded
    attention_mask: torch.Tensor
    labels: torch.Tensor  # IGNORE outside the reply (and its end-of-sequence token)

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def reply_token_losses(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of every reply token, [tokens] in float32, and the batch row of each. The LM
    head runs only where a reply token is predicted: on SmolLM2 it is a fifth of a forward's compute
    and replies are a quarter to two thirds of a training sequence."""
    hidden = model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    labels = batch.labels[:, 1:]
    keep = labels != IGNORE
    logits = model.get_output_embeddings()(hidden[:, :-1][keep]).float()
    return torch.nn.functional.cross_entropy(logits, labels[keep], reduction="none"), keep.nonzero()[:, 0]


def prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The chat template up to the assistant's turn: what the server feeds the model."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]


def encode(tokenizer, example: Example | Conversation | DomainExample) -> tuple[list[int], list[int]]:
    if isinstance(example, (Conversation, DomainExample)):
        return encode_conversation(tokenizer, getattr(example, "conversation", example))
    prompt = prompt_ids(tokenizer, example.messages())
    reply = tokenizer(example.answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return prompt + reply, [IGNORE] * len(prompt) + reply


def collate(tokenizer, items: list[Example | Conversation]) -> Batch:
    encoded = [encode(tokenizer, e) for e in items]
    length = max(len(ids) for ids, _ in encoded)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(items), length), pad, dtype=torch.long)
    labels = torch.full((len(items), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    for row, (ids, labs) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        mask[row, : len(ids)] = 1
    return Batch(input_ids, mask, labels)


def batches(tokenizer, items: list[Example | Conversation], size: int) -> list[Batch]:
    return [collate(tokenizer, items[i : i + size]) for i in range(0, len(items), size)]
