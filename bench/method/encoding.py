"""Token ids for the benchmark, shared by pretraining and evaluation.

Both go through the trainer's own `tokenize_views`, so the base model is pretrained and measured on
exactly the token sequences preference training sees.
"""

from __future__ import annotations

import torch

from preference_dpo.instruction import template_default_system
from preference_dpo.views import tokenize_views

from . import world


def tokenize_rows(tokenizer, rows: list[dict]) -> list[dict]:
    """`tokenize_views` of conversational rows: base and instructed prompt ids, chosen and rejected ids."""
    default_system = template_default_system(tokenizer)
    return [tokenize_views(r, tokenizer, world.INSTRUCTION, "system", 0, 10_000, default_system) for r in rows]


def right_pad(sequences: list[tuple[list[int], list[int]]], pad_id: int):
    """(input_ids, attention_mask, response_mask) of right-padded `prompt + response` sequences."""
    width = max(len(p) + len(r) for p, r in sequences)
    ids = torch.full((len(sequences), width), pad_id)
    attention = torch.zeros_like(ids)
    response = torch.zeros_like(ids, dtype=torch.bool)
    for i, (p, r) in enumerate(sequences):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        attention[i, : len(p) + len(r)] = 1
        response[i, len(p) : len(p) + len(r)] = True
    return ids, attention, response
