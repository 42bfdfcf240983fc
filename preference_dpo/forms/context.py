"""`context_distill`: instruction distillation on the frozen reference's own instructed answers (docs/method.md,
"Context distillation"; Snell et al. 2022, "Learning by Distilling Context").

Before training, the frozen reference answers every pair's prompt WITH the instruction, greedily, once
(`trainer.precompute_context_answers`, cached like the reference's other columns). At every step the policy
reads those answers WITHOUT the instruction, the reference reads them with it, and KL(reference || policy) of
the next-token distributions at every answer token is summed per answer (the scale of `sequence_sum`) and
averaged over the answers. The DPO loss on the pairs is unchanged.

Where `ref_distill` asks the un-instructed policy to match the instructed reference on the pairs' responses
(text the instructed model would not write: an English answer under "Answer in French."), this form matches it
on text the instructed model does write, so the student learns the instructed answers rather than how the
instructed model would continue someone else's.
"""

from __future__ import annotations

import torch

from ..losses import chunked_divergence, reduce_token_kl
from .base import AlignedForm, FormInputs


class ContextDistill(AlignedForm):
    name = "context_distill"
    teacher = "reference"

    def prepare(self, trainer, dataset, split: str):
        if not trainer.has_reference():
            raise ValueError("ALIGN_LOSS=context_distill needs a frozen reference: LoRA, or a reference model.")
        if split == "train" and self.args.on_policy_max_new_tokens is None:
            # answers as long as the longest chosen response of the pairs (the data's own bound)
            self.args.on_policy_max_new_tokens = max(1, max(len(ids) for ids in dataset["chosen_ids"]))
        dataset = trainer.precompute_context_answers(dataset, split)
        return trainer.precompute_reference_guided(dataset, split)  # the instructed margins `target` reads

    def answers(self, inputs: FormInputs) -> list[list[int]]:
        """The batch's precomputed answers, one per pair."""
        ids, lengths = inputs.batch["context_answer_ids"], inputs.batch["context_answer_lengths"]
        return [row[:n] for row, n in zip(ids.tolist(), lengths.tolist(), strict=True)]

    def loss(self, inputs: FormInputs) -> torch.Tensor:
        scored = inputs.score(self.answers(inputs))
        per_token = chunked_divergence(scored.student, scored.teacher, scored.student_head, scored.teacher_head)
        return reduce_token_kl(per_token, scored.lengths, "sequence_sum")
