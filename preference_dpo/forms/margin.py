"""The margin forms: raise the un-instructed margin h_base to an instructed one (docs/method.md, "The loss")."""

from __future__ import annotations

import torch

from ..losses import hinge_aligned_loss
from .base import AlignedForm, FormInputs


class Hinge(AlignedForm):
    """`hinge`, the user guide's form: mean(relu(stopgrad(h_pref) - h_base)), h_pref the policy's own
    instructed margin (it rises with h_base, so the term never saturates)."""

    name = "hinge"
    teacher = "policy"

    def loss(self, inputs: FormInputs) -> torch.Tensor:
        return hinge_aligned_loss(self.target(inputs), inputs.base.margin)


class RefHinge(Hinge):
    """`ref_hinge`: the same hinge against the frozen reference's instructed margin, a fixed target,
    precomputed once (`trainer.precompute_reference_guided`)."""

    name = "ref_hinge"
    teacher = "reference"

    def prepare(self, trainer, dataset, split: str):
        return trainer.precompute_reference_guided(dataset, split)
