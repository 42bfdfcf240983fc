"""The two views of every pair (docs/method.md): base `x, y` and guided `x with p, y`.

Both views share the exact completion token ids: each prompt is cut where its tokenization and that of
prompt + completion part (TRL's rule), and a pair whose completion ids then differ between the views is
dropped. Completions are cut so that the *guided* sequence fits `max_length`, which makes the base sequence
fit too and keeps the two views' completions identical.

- Text mode: `p` is text placed in the prompt (`insert_instruction`) and tokenized with it.
- Embedding mode: `p` is `k` soft tokens. The guided prompt is the base prompt followed by `k`
  placeholder ids; the trainer swaps their input embeddings for the loaded tensor (`soft_token_mask`,
  `soft_prompt.insert_soft_tokens`).

The instruction's text and the template's own system message live in `instruction.py`, soft-prompt files in
`soft_prompt.py`, batching in `collator.py`.
"""

from __future__ import annotations

import logging
from typing import Any

from trl.data_utils import common_prefix_length

from .errors import UserInputError
from .instruction import insert_instruction, template_default_system

logger = logging.getLogger(__name__)


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
