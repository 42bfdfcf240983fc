"""The contract between the trainer and an aligned-loss form.

`AlignedForm` declares what a form needs; `FormInputs` is what one batch offers it. Each quantity of
`FormInputs` is computed when a form (or the trainer's metrics) first asks for it, once per batch, so a form
that takes its teacher from precomputed columns never runs the policy's guided forward in training, and plain
DPO (ALPHA=0) runs nothing extra at all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from ..head_pass import Teacher
from ..losses import LMHead


@dataclass(frozen=True)
class GuidedLogps:
    """Summed response log-probs of one view, per pair; with `hidden`, also the final hidden states at every
    response position, ordered like the base view's (chosen rows, then rejected rows, tokens in order)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    hidden: torch.Tensor | None = None

    @property
    def margin(self) -> torch.Tensor:
        return self.chosen - self.rejected


@dataclass(frozen=True)
class ScoredAnswers:
    """Answers (the policy's own for the on-policy form, the reference's for the context form) scored after both
    views: the final hidden states at the positions that predict each answer token, answer after answer, of the
    student (the policy without the instruction, with gradient) and of the teacher (the frozen reference with
    it), and their LM heads."""

    student: torch.Tensor
    teacher: torch.Tensor
    lengths: torch.Tensor  # tokens per answer
    student_head: LMHead
    teacher_head: LMHead


@dataclass
class GuidedViews:
    """The batch's guided views, each computed once, when first asked for (again only to add hidden states):
    `compute(who, with_hidden)`, who = "policy" (policy weights, no gradient, eval mode) or "reference" (the
    frozen reference: its precomputed margins if the batch carries them, else a pass now); and the LM head that
    scores each one's hidden states."""

    compute: Callable[[str, bool], GuidedLogps]
    lm_heads: Callable[[str], LMHead]  # "policy" / "reference" -> the LM head that scores its hidden states
    _done: dict = field(default_factory=dict)

    def __call__(self, who: Literal["policy", "reference"], with_hidden: bool = False) -> GuidedLogps:
        done = self._done.get(who)
        if done is None or (with_hidden and done.hidden is None):
            self._done[who] = done = self.compute(who, with_hidden)
        return done

    def computed(self, who: str) -> bool:
        return who in self._done


@dataclass
class FormInputs:
    """One batch, as a form sees it.

    `base` holds the base view's summed log-probs from TRL's forward (with gradient); `student_hidden`, for the
    per-token forms, its final hidden states at the response positions (with gradient). The guided views come
    from `views` (`GuidedViews`), the same the trainer handed `AlignedForm.head_teacher` before the forward.
    """

    mode: str
    base: GuidedLogps
    batch: dict  # the guided view's tensors and any precomputed columns (`collator.split_views`)
    response_lengths: torch.Tensor  # response positions per row of the base view
    views: GuidedViews
    token_mean_divisor: Callable[[torch.Tensor], torch.Tensor | None]
    student_hidden: torch.Tensor | None = None
    head_kl: torch.Tensor | None = None  # per response position: the KL to `head_teacher`, from the head pass
    step: int = 0  # the optimizer step being taken (0-based)
    answers: Callable[[], ScoredAnswers] | None = None  # the policy's own answers to the pairs' prompts, scored
    score: Callable[[list[list[int]]], ScoredAnswers] | None = None  # given answers (one per pair), scored
    _answers: ScoredAnswers | None = None

    def own_answers(self) -> ScoredAnswers:
        """The policy's sampled answers to this batch's prompts, generated and scored once per batch."""
        if self._answers is None:
            self._answers = self.answers()
        return self._answers

    def guided(self, who: Literal["policy", "reference"], with_hidden: bool = False) -> GuidedLogps:
        """`who`'s guided view of the pairs, computed once per batch (again only to add hidden states)."""
        return self.views(who, with_hidden)

    def guided_computed(self, who: str) -> bool:
        return self.views.computed(who)

    def lm_heads(self, who: str) -> LMHead:
        return self.views.lm_heads(who)


class AlignedForm:
    """One form of the aligned loss (docs/method.md, "Forms of the aligned loss").

    Class attributes declare what it needs:
    - `teacher`: whose instructed view the un-instructed policy is pulled towards, "policy" (its own, no
      gradient) or "reference" (the frozen base model's); its margin is the target of `aligned_active_frac`;
    - `per_token`: it compares next-token distributions at every response position, so it needs the base
      view's final hidden states with gradient and the model's LM head (checked once at start).
    """

    name: ClassVar[str]
    teacher: ClassVar[Literal["policy", "reference"]]
    per_token: ClassVar[bool] = False

    def __init__(self, args) -> None:
        self.args = args

    def prepare(self, trainer, dataset, split: str):
        """`dataset` with whatever the form reads from the reference precomputed (default: nothing)."""
        return dataset

    def head_teacher(self, batch: dict, views: GuidedViews) -> Teacher | None:
        """A teacher to score in the base view's own LM-head pass (`head_pass`), its KL handed back as
        `FormInputs.head_kl`; None (the default) for a form without one. Asked before the base view's forward."""
        return None

    def target(self, inputs: FormInputs) -> torch.Tensor:
        """The instructed margin the pairs aim at: `aligned_active_frac` counts the pairs below it."""
        return inputs.guided(self.teacher).margin

    def loss(self, inputs: FormInputs) -> torch.Tensor:
        raise NotImplementedError

    def metrics(self, inputs: FormInputs) -> dict[str, torch.Tensor]:
        """The form's own metrics of the batch, after `loss` (logged as `metrics.METRIC_TAGS` names them)."""
        return {}
