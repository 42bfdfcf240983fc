"""The preference instruction in embedding mode: soft-prompt files (read safely and checked) and the swap of the
placeholder embeddings for the soft prompt's rows."""

from __future__ import annotations

import os
from typing import Any

import torch

from .errors import UserInputError


def load_prompt_embedding(path: str | os.PathLike, hidden_size: int) -> torch.Tensor:
    """Read and check a soft prompt: a float tensor [k, hidden_size] (or [hidden_size], read as k=1).

    Never runs pickled code: `.safetensors` files are read with safetensors, anything else with
    `torch.load(weights_only=True)`, which refuses arbitrary objects. Accepted containers: a bare tensor,
    or a dict holding exactly one 2-D float tensor.
    """
    where = f"PROMPT_EMBEDDING_PATH {str(path)!r}"
    if not os.path.isfile(path):
        raise UserInputError(f"{where}: no such file.")
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            content: Any = load_file(str(path))
        else:
            content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types; the message says what was refused
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            reason = "it holds pickled Python objects, which are refused so that loading cannot run code"
        raise UserInputError(f"{where}: cannot be read as a tensor file: {reason}.") from None

    if isinstance(content, dict):
        candidates = {k: v for k, v in content.items() if torch.is_tensor(v) and v.dim() == 2 and v.is_floating_point()}
        if len(candidates) != 1:
            raise UserInputError(
                f"{where}: a dict must hold exactly one 2-D float tensor (e.g. 'prompt_embeddings'); "
                f"found {len(candidates)} among keys {sorted(map(str, content))}."
            )
        content = next(iter(candidates.values()))
    if not torch.is_tensor(content):
        raise UserInputError(f"{where}: holds a {type(content).__name__}, not a tensor.")
    if not content.is_floating_point():
        raise UserInputError(f"{where}: tensor has dtype {content.dtype}; soft prompts must be floating point.")
    if content.dim() == 1:
        content = content.unsqueeze(0)
    if content.dim() != 2:
        raise UserInputError(
            f"{where}: tensor has shape {tuple(content.shape)}; expected [num_tokens, hidden_size] or [hidden_size]."
        )
    if content.numel() == 0 or content.shape[0] == 0:
        raise UserInputError(f"{where}: tensor is empty (shape {tuple(content.shape)}); it needs at least one token.")
    if content.shape[1] != hidden_size:
        raise UserInputError(
            f"{where}: embedding dimension is {content.shape[1]} but the model's hidden size is {hidden_size}; "
            "use embeddings trained for this model."
        )
    if not torch.isfinite(content).all():
        raise UserInputError(f"{where}: tensor holds NaN or Inf values.")
    return content.detach().to(torch.float32).contiguous()


def insert_soft_tokens(embeds: torch.Tensor, mask: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """`embeds` [rows, len, d] with the placeholders at `mask` replaced by the soft prompt `soft` [k, d].

    Each row holds `k` placeholders, in order (`tokenize_views` puts them right after the prompt); `soft`
    keeps its gradient, so the same function serves embedding mode and the stage that learns the prompt.
    """
    soft = soft.to(device=embeds.device, dtype=embeds.dtype)
    return embeds.masked_scatter(mask.unsqueeze(-1), soft.repeat(embeds.size(0), 1))
