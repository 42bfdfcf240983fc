"""The two views of every pair (docs/method.md): base `x, y` and guided `x with p, y`.

Both views share the exact completion token ids: each prompt is cut where its tokenization and that of
prompt + completion part (TRL's rule), and a pair whose completion ids then differ between the views is
dropped. Completions are cut so that the *guided* sequence fits `max_length`, which makes the base sequence
fit too and keeps the two views' completions identical.

- Text mode: `p` is text placed in the prompt (`insert_instruction`) and tokenized with it.
- Embedding mode: `p` is `k` soft tokens. The guided prompt is the base prompt followed by `k`
  placeholder ids; the trainer swaps their input embeddings for the loaded tensor (`soft_token_mask`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from trl.data_utils import common_prefix_length
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import pad

from .errors import UserInputError

logger = logging.getLogger(__name__)


# --- text mode ---------------------------------------------------------------------------------------


def template_default_system(tokenizer) -> str:
    """The system text a chat template renders for a conversation that has none ("" if it adds none).

    Qwen2.5's template adds "You are Qwen, created by Alibaba Cloud. ..." when no system message is given.
    A guided prompt that brought its own system message would silently drop that text, and the two views
    would differ by more than the instruction; so the instruction is appended to this default instead.
    Only PREFERENCE_POSITION=system needs it: a template that refuses a system message (Gemma, Mistral v0.1)
    is a `UserInputError` that suggests PREFERENCE_POSITION=user.
    """
    from jinja2.exceptions import TemplateError

    sentinel = "\x1fSYSTEM\x1f"
    user = [{"role": "user", "content": "x"}]
    plain = tokenizer.apply_chat_template(user, tokenize=False)
    try:
        with_system = tokenizer.apply_chat_template([{"role": "system", "content": sentinel}, *user], tokenize=False)
    except TemplateError as e:
        raise UserInputError(
            f"The tokenizer's chat template does not accept a system message ({str(e).strip() or 'TemplateError'}), so "
            "PREFERENCE_POSITION=system has nowhere to put the instruction; set PREFERENCE_POSITION=user (the "
            "instruction then opens the first user message)."
        ) from None
    if sentinel not in with_system:
        return ""
    head, tail = with_system.split(sentinel, 1)
    if plain.startswith(head) and plain.endswith(tail) and len(plain) > len(head) + len(tail):
        return plain[len(head) : len(plain) - len(tail)]
    return ""


def insert_instruction(
    prompt: str | list[dict[str, str]], text: str, position: str = "system", default_system: str = ""
):
    """The prompt with the instruction `text` in it (a new object; `prompt` is not modified).

    Plain strings: `text`, a blank line, the prompt. Conversations, `position="system"`: appended after a
    blank line to the first system message, or else to the chat template's `default_system` text in a new
    system message first; `position="user"`: before the first user message, followed by a blank line.
    """
    if isinstance(prompt, str):
        return f"{text}\n\n{prompt}"
    messages = [dict(m) for m in prompt]
    if position == "system":
        if messages and messages[0]["role"] == "system":
            messages[0]["content"] = f"{messages[0]['content']}\n\n{text}"
        else:
            content = f"{default_system}\n\n{text}" if default_system else text
            messages.insert(0, {"role": "system", "content": content})
        return messages
    if position == "user":
        for message in messages:
            if message["role"] == "user":
                message["content"] = f"{text}\n\n{message['content']}"
                return messages
        raise UserInputError("A conversational prompt has no user message to put the instruction before.")
    raise ValueError(f"unknown instruction position {position!r}")


# --- embedding mode ----------------------------------------------------------------------------------


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


# --- tokenization of both views ------------------------------------------------------------------------


def _ids(tokenizer, value, **chat_kwargs) -> list[int]:
    if isinstance(value, list):
        from jinja2.exceptions import TemplateError

        try:
            rendered = tokenizer.apply_chat_template(value, tokenize=True, return_dict=True, **chat_kwargs)
        except TemplateError as e:  # e.g. a system message in the data, for a template without a system role
            roles = ", ".join(dict.fromkeys(m.get("role", "?") for m in value))
            raise UserInputError(
                f"The chat template refuses a conversation of the data (roles: {roles}): {str(e).strip()}. "
                "Remove the messages of that role from the data set, or use a model whose template accepts them."
            ) from None
        return list(rendered["input_ids"])
    return list(tokenizer(text=value)["input_ids"])


def _split(tokenizer, prompt, chosen, rejected, chat: dict[str, Any]) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, chosen ids, rejected ids), TRL's rule: the prompt ends where the tokenizations of `prompt`
    and of `prompt + response` part (a trailing space, or a generation prompt the rendered assistant turn
    spells differently, goes with the response)."""
    prompt_ids = _ids(tokenizer, prompt, **chat)
    prompt_chosen_ids = _ids(tokenizer, prompt + chosen)
    prompt_rejected_ids = _ids(tokenizer, prompt + rejected)
    n = min(common_prefix_length(prompt_ids, prompt_chosen_ids), common_prefix_length(prompt_ids, prompt_rejected_ids))
    return prompt_ids[:n], prompt_chosen_ids[n:], prompt_rejected_ids[n:]


def tokenize_views(
    example: dict[str, Any],
    tokenizer,
    preference_text: str | None,
    preference_position: str,
    num_soft_tokens: int,
    max_length: int,
    default_system: str = "",
) -> dict[str, Any]:
    """Token ids of one pair's base prompt, guided prompt and the two shared completions.

    Mirrors TRL's DPO tokenization for the base view (chat template with generation prompt; EOS added to
    plain-text completions; completion starts where prompt and prompt+completion diverge). The guided prompt
    is cut by the same rule against guided prompt + completion; `views_match` is false when the guided view's
    completion ids then differ from the base view's (the pair cannot be scored on the same tokens in both).
    Completions are cut to `max_length - len(guided_prompt_ids)` tokens (`truncated` tells whether any was).
    """
    prompt, chosen, rejected = example["prompt"], example["chosen"], example["rejected"]
    conversational = isinstance(prompt, list)
    if not conversational:
        eos = tokenizer.eos_token
        chosen = chosen if chosen.endswith(eos) else chosen + eos
        rejected = rejected if rejected.endswith(eos) else rejected + eos
    chat = {"add_generation_prompt": True} if conversational else {}
    prompt_ids, chosen_ids, rejected_ids = _split(tokenizer, prompt, chosen, rejected, chat)

    views_match = True
    if num_soft_tokens:
        guided_prompt_ids = prompt_ids + [tokenizer.pad_token_id] * num_soft_tokens
    else:
        guided_prompt = insert_instruction(prompt, preference_text, preference_position, default_system)
        guided_prompt_ids, guided_chosen_ids, guided_rejected_ids = _split(
            tokenizer, guided_prompt, chosen, rejected, chat
        )
        views_match = guided_chosen_ids == chosen_ids and guided_rejected_ids == rejected_ids

    room = max(max_length - len(guided_prompt_ids), 0)
    truncated = len(chosen_ids) > room or len(rejected_ids) > room
    return {
        "prompt_ids": prompt_ids,
        "guided_prompt_ids": guided_prompt_ids,
        "chosen_ids": chosen_ids[:room],
        "rejected_ids": rejected_ids[:room],
        "truncated": truncated,
        "views_match": views_match,
    }


def tokenize_preference_dataset(
    dataset,
    tokenizer,
    *,
    name: str,
    preference_text: str | None,
    preference_position: str,
    num_soft_tokens: int,
    max_length: int,
    max_prompt_length: int,
    num_proc: int | None = None,
    return_counts: bool = False,
):
    """Tokenize both views of every pair and drop pairs whose guided prompt exceeds `max_prompt_length`, and
    pairs whose response ids differ between the two views (`tokenize_views`' `views_match`).

    The limit applies to the guided prompt (the longer one) so that runs with and without the aligned loss
    see the same pairs. Raises `UserInputError` if no pair is left. The counts of dropped and truncated pairs
    are logged (`log_pair_counts`) and, with `return_counts`, returned too: `(dataset, counts)`, so that a
    cached data set can state them again.
    """
    if num_soft_tokens >= max_prompt_length:
        raise UserInputError(
            f"The prompt embedding has {num_soft_tokens} virtual tokens, which leaves no room for a prompt within "
            f"MAX_PROMPT_LENGTH (--max_prompt_length) = {max_prompt_length}; raise it or use fewer tokens."
        )
    conversational = isinstance(dataset[0]["prompt"], list)
    in_system = conversational and not num_soft_tokens and preference_position == "system"
    default_system = template_default_system(tokenizer) if in_system else ""
    counts = {"name": name, "pairs": len(dataset), "max_length": max_length, "max_prompt_length": max_prompt_length}
    if default_system:
        # Only prompts without a system message of their own get the default one (see insert_instruction).
        counts["default_system"] = sum(not (prompt and prompt[0]["role"] == "system") for prompt in dataset["prompt"])
    tokenized = dataset.map(
        tokenize_views,
        fn_kwargs={
            "default_system": default_system,
            "tokenizer": tokenizer,
            "preference_text": preference_text,
            "preference_position": preference_position,
            "num_soft_tokens": num_soft_tokens,
            "max_length": max_length,
        },
        remove_columns=dataset.column_names,
        num_proc=num_proc,
        desc=f"Tokenizing both views of the {name} pairs",
    )
    total = len(tokenized)
    mismatched = total - sum(tokenized["views_match"])
    if mismatched == total:
        raise UserInputError(
            f"All {total} {name} pairs were dropped: their response tokens differ between the prompt with the "
            "instruction and the prompt without it (the tokenizer or chat template renders the response differently "
            "once the instruction is in), so the two views cannot score the same tokens; try PREFERENCE_POSITION="
            f"{'user' if preference_position == 'system' else 'system'} or TRAINING_MODE=embedding."
        )
    counts["mismatched"] = mismatched
    if mismatched:
        tokenized = tokenized.filter(lambda ex: ex["views_match"], num_proc=num_proc)
        total = len(tokenized)
    tokenized = tokenized.remove_columns("views_match")
    kept = tokenized.filter(
        lambda ex: len(ex["guided_prompt_ids"]) <= max_prompt_length,
        num_proc=num_proc,
        desc=f"Dropping {name} pairs over MAX_PROMPT_LENGTH",
    )
    if len(kept) == 0:
        longest = max(len(ids) for ids in tokenized["guided_prompt_ids"])
        raise UserInputError(
            f"All {total} {name} pairs were dropped: every prompt with the instruction is longer than "
            f"MAX_PROMPT_LENGTH (--max_prompt_length) = {max_prompt_length} tokens (longest: {longest}); raise "
            "MAX_PROMPT_LENGTH (and MAX_LENGTH) or shorten the instruction."
        )
    counts.update(over_prompt_length=total - len(kept), truncated=sum(kept["truncated"]), kept=len(kept))
    log_pair_counts(counts)
    kept = kept.remove_columns("truncated")
    return (kept, counts) if return_counts else kept


def log_pair_counts(counts: dict[str, Any]) -> None:
    """Say how many pairs of a split tokenization dropped or truncated (`tokenize_preference_dataset`'s counts):
    when the split is tokenized, and again when its tokenized views are reused from the cache."""
    name, pairs = counts["name"], counts["pairs"]
    if counts.get("default_system"):
        logger.info(
            "The chat template's default system message is kept in %d of %d %s prompts (those without a system "
            "message of their own); the instruction is appended to it.",
            counts["default_system"],
            pairs,
            name,
        )
    if counts["mismatched"]:
        logger.warning(
            "Dropped %d of %d %s pairs whose response tokens differ between the prompt with the instruction and the "
            "prompt without it (the two views must score the same tokens).",
            counts["mismatched"],
            pairs,
            name,
        )
    if counts["over_prompt_length"]:
        logger.warning(
            "Dropped %d of %d %s pairs whose prompt with the instruction exceeds MAX_PROMPT_LENGTH=%d tokens.",
            counts["over_prompt_length"],
            pairs - counts["mismatched"],
            name,
            counts["max_prompt_length"],
        )
    if counts["truncated"]:
        logger.info(
            "Truncated the responses of %d of %d %s pairs to fit MAX_LENGTH=%d (both views keep the same tokens).",
            counts["truncated"],
            counts["kept"],
            name,
            counts["max_length"],
        )


# --- batching ---------------------------------------------------------------------------------------


@dataclass
class PreferenceViewsCollator(DataCollatorForPreference):
    """TRL's preference collator, plus the guided view of the same pairs under `guided_*` keys.

    `guided_forward="shared_prompt"`: the guided prompts once per pair, left-padded so that they all end
    in the last column (`guided_prompt_input_ids`, `guided_prompt_attention_mask`), and the responses
    alone, right-padded, chosen rows then rejected rows (`guided_completion_ids`,
    `guided_completion_attention_mask`). `guided_forward="full"`: whole guided sequences laid out like the
    base batch (`guided_input_ids`, `guided_attention_mask`, `guided_completion_mask`).
    The soft-token mask (embedding mode) marks the `num_soft_tokens` placeholders ending each guided prompt.
    """

    num_soft_tokens: int = 0
    guided_forward: str = "shared_prompt"

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().torch_call(examples)
        if "ref_guided_chosen_logps" in examples[0]:  # ALIGN_LOSS=ref_hinge: the reference's guided view
            for side in ("chosen", "rejected"):
                batch[f"guided_ref_{side}_logps"] = torch.tensor([ex[f"ref_guided_{side}_logps"] for ex in examples])
        if "teacher_chosen" in examples[0]:  # ALIGN_LOSS=ref_distill --distill_top_k: the precomputed teacher
            from .teacher import collate_teacher

            batch.update(collate_teacher(examples))
        if self.guided_forward == "shared_prompt":
            batch.update(self._shared_prompt_view(examples))
            return batch
        guided_examples = [
            {"prompt_ids": ex["guided_prompt_ids"], "chosen_ids": ex["chosen_ids"], "rejected_ids": ex["rejected_ids"]}
            for ex in examples
        ]
        guided = super().torch_call(guided_examples)
        batch["guided_input_ids"] = guided["input_ids"]
        batch["guided_attention_mask"] = guided["attention_mask"]
        batch["guided_completion_mask"] = guided["completion_mask"]
        if self.num_soft_tokens:
            mask = torch.zeros_like(guided["input_ids"], dtype=torch.bool)
            for row, ex in enumerate(guided_examples + guided_examples):  # rows: chosen..., rejected...
                end = len(ex["prompt_ids"])
                mask[row, end - self.num_soft_tokens : end] = True
            batch["guided_soft_token_mask"] = mask
        return batch

    def _shared_prompt_view(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        prompts = [torch.tensor(ex["guided_prompt_ids"]) for ex in examples]
        completions = [torch.tensor(ex[key]) for key in ("chosen_ids", "rejected_ids") for ex in examples]
        view = {
            "guided_prompt_input_ids": pad(prompts, padding_value=self.pad_token_id, padding_side="left"),
            "guided_prompt_attention_mask": pad([torch.ones_like(p) for p in prompts], 0, padding_side="left"),
            "guided_completion_ids": pad(completions, padding_value=self.pad_token_id, padding_side="right"),
            "guided_completion_attention_mask": pad([torch.ones_like(c) for c in completions], 0, padding_side="right"),
        }
        if self.num_soft_tokens:
            mask = torch.zeros_like(view["guided_prompt_input_ids"], dtype=torch.bool)
            mask[:, -self.num_soft_tokens :] = True  # left-padded: every prompt ends in the last column
            view["guided_prompt_soft_token_mask"] = mask
        return view


def split_views(inputs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(base inputs as TRL expects them, guided inputs with the `guided_` prefix removed)."""
    base = {k: v for k, v in inputs.items() if not k.startswith("guided_")}
    guided = {k.removeprefix("guided_"): v for k, v in inputs.items() if k.startswith("guided_")}
    return base, guided
