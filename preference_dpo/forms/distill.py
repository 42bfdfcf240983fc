"""The distillation forms: the KL from an instructed teacher's next-token distribution to the un-instructed
policy's at every response position of the base view, reduced per --distill_reduction (docs/method.md,
"Forms of the aligned loss" and "Top-K teacher")."""

from __future__ import annotations

import torch

from ..head_pass import HiddenTeacher, Teacher, TopKTeacher
from ..losses import chunked_divergence, chunked_rows, reduce_token_kl, topk_token_kl
from .base import AlignedForm, FormInputs, GuidedViews


class Distill(AlignedForm):
    """`distill`: the teacher is the policy's own guided view (no gradient, eval mode), scored through its own
    LM head."""

    name = "distill"
    teacher = "policy"
    per_token = True

    def loss(self, inputs: FormInputs) -> torch.Tensor:
        return self.reduce(inputs, self.per_token_kl(inputs))

    def head_teacher(self, batch: dict, views: GuidedViews) -> Teacher | None:
        """The teacher's guided hidden states, scored exactly in the base view's head pass."""
        return HiddenTeacher(views(self.teacher, with_hidden=True).hidden, views.lm_heads(self.teacher))

    def per_token_kl(self, inputs: FormInputs) -> torch.Tensor:
        """KL(teacher || student) at every response position of the batch: from the base view's head pass, or
        else from the teacher's final hidden states through the teacher's LM head, in chunks (`chunked_rows`)."""
        if inputs.head_kl is not None:
            return inputs.head_kl
        student_head, teacher_head = inputs.lm_heads("policy"), inputs.lm_heads(self.teacher)
        teacher = inputs.guided(self.teacher, with_hidden=True).hidden
        return chunked_divergence(inputs.student_hidden, teacher, student_head, teacher_head)

    def reduce(self, inputs: FormInputs, per_token: torch.Tensor) -> torch.Tensor:
        lengths = inputs.response_lengths
        return reduce_token_kl(per_token, lengths, self.args.distill_reduction, inputs.token_mean_divisor(lengths))


class RefDistill(Distill):
    """`ref_distill`: the teacher is the frozen reference's guided view: exact (the reference runs every step),
    or its top-K ids and one bucket for the rest, precomputed once (--distill_top_k, `teacher.py`)."""

    name = "ref_distill"
    teacher = "reference"

    def prepare(self, trainer, dataset, split: str):
        if self.args.distill_top_k:
            return trainer.precompute_topk_teacher(dataset, split)
        if not trainer.has_reference():
            raise ValueError("ALIGN_LOSS=ref_distill without LoRA needs a reference model or --distill_top_k.")
        return dataset

    def head_teacher(self, batch: dict, views: GuidedViews) -> Teacher | None:
        if "teacher_ids" not in batch:  # exact: the reference's guided hidden states, a pass now
            return super().head_teacher(batch, views)
        return TopKTeacher(batch["teacher_ids"], batch["teacher_logps"], batch["teacher_log_rest"])

    def per_token_kl(self, inputs: FormInputs) -> torch.Tensor:
        batch = inputs.batch
        if "teacher_ids" not in batch:
            return super().per_token_kl(inputs)
        if not torch.equal(batch["teacher_lengths"].to(inputs.response_lengths.device), inputs.response_lengths):
            raise RuntimeError("The precomputed teacher's response positions differ from the batch's.")
        if inputs.head_kl is not None:  # scored with the labels in the base view's one head pass
            return inputs.head_kl
        student_head = inputs.lm_heads("policy")
        return chunked_rows(
            lambda s, i, lp, r: topk_token_kl(student_head.logits(s), i, lp, r),
            inputs.student_hidden, batch["teacher_ids"], batch["teacher_logps"], batch["teacher_log_rest"],
        )  # fmt: skip
