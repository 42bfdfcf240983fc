"""Batches of both views: TRL's preference collator plus the guided view under `guided_*` keys, and their split
back into what TRL's loss reads and what the aligned loss reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import pad


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
        if "context_answer_ids" in examples[0]:  # ALIGN_LOSS=context_distill: the reference's instructed answers
            answers = [torch.tensor(ex["context_answer_ids"]) for ex in examples]
            batch["guided_context_answer_ids"] = pad(answers, padding_value=self.pad_token_id, padding_side="right")
            batch["guided_context_answer_lengths"] = torch.tensor([len(a) for a in answers])
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
