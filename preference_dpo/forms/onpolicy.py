"""`onpolicy_distill`: instruction distillation on the policy's own answers (docs/method.md, "On-policy
distillation").

On a fraction DISTILL_ON_POLICY_FRAC of the optimizer steps, the policy answers the batch's prompts WITHOUT the
instruction (sampled, `trainer.generate_answers`); the frozen reference scores those answers WITH the
instruction, and the divergence between the two next-token distributions at every answer token is summed per
answer (the scale of `sequence_sum`) and averaged over the answers. On the other steps, and in evaluation, the
same divergence is taken on the pairs' own responses, as `ref_distill` exact takes its KL. The DPO loss on the
pairs is unchanged. Nothing of it is cacheable: the answers are new at every step.
"""

from __future__ import annotations

import torch

from ..losses import chunked_divergence, generalized_jsd, reduce_token_kl, reverse_kl, steps_on_policy
from .base import AlignedForm, FormInputs


class OnPolicyDistill(AlignedForm):
    name = "onpolicy_distill"
    teacher = "reference"
    per_token = True

    def prepare(self, trainer, dataset, split: str):
        if not trainer.has_reference():
            raise ValueError("ALIGN_LOSS=onpolicy_distill needs a frozen reference: LoRA, or a reference model.")
        if split == "train" and self.args.on_policy_max_new_tokens is None:
            # answers as long as the longest chosen response of the pairs (the data's own bound)
            self.args.on_policy_max_new_tokens = max(1, max(len(ids) for ids in dataset["chosen_ids"]))
        return dataset

    def divergence(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        if self.args.on_policy_divergence == "jsd":
            return generalized_jsd(student_logits, teacher_logits, self.args.on_policy_jsd_beta)
        return reverse_kl(student_logits, teacher_logits)

    def on_policy(self, inputs: FormInputs) -> bool:
        return inputs.mode == "train" and steps_on_policy(inputs.step, self.args.distill_on_policy_frac)

    def loss(self, inputs: FormInputs) -> torch.Tensor:
        if self.on_policy(inputs):
            scored = inputs.own_answers()
            student, teacher, lengths = scored.student, scored.teacher, scored.lengths
            student_head, teacher_head = scored.student_head, scored.teacher_head
        else:  # the pairs' responses, as exact ref_distill
            student, lengths = inputs.student_hidden, inputs.response_lengths
            teacher = inputs.guided("reference", with_hidden=True).hidden
            student_head, teacher_head = inputs.lm_heads("policy"), inputs.lm_heads("reference")
        per_token = chunked_divergence(student, teacher, student_head, teacher_head, self.divergence)
        return reduce_token_kl(per_token, lengths, "sequence_sum")

    def metrics(self, inputs: FormInputs) -> dict[str, torch.Tensor]:
        if inputs.mode != "train":  # evaluation takes the pairs' responses: nothing of its own to log
            return {}
        on_policy = self.on_policy(inputs)
        device = inputs.response_lengths.device
        metrics = {"onpolicy_frac": torch.tensor(float(on_policy), device=device)}
        if on_policy:
            metrics["onpolicy_generated_length"] = inputs.own_answers().lengths.float().mean()
        return metrics
