"""The preference-guided DPO objective as pure tensor functions (docs/method.md, "The loss").

Inputs are per-pair summed log-probs of the response tokens, shape [batch]:

    h_base = logp_theta(y_w | x)   - logp_theta(y_l | x)         (with gradient)
    h_pref = logp_theta(y_w | p,x) - logp_theta(y_l | p,x)       (no gradient: the guided view)
    h_ref_pref = logp_ref(y_w | p,x) - logp_ref(y_l | p,x)       (the frozen reference, guided view)
    dpo_loss     = mean(-log sigmoid(beta * [(logp(y_w|x) - ref(y_w|x)) - (logp(y_l|x) - ref(y_l|x))]))
    aligned_loss = mean(relu(stopgrad(h_pref) - h_base))          ("hinge", the user's method)
                 = mean(relu(h_ref_pref - h_base))                  ("ref_hinge")
    loss         = dpo_loss + alpha * aligned_loss

The trainer takes `dpo_loss` from TRL (any TRL `loss_type`); `dpo_sigmoid_loss` here is the reference
formula the tests hold TRL's value to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def dpo_sigmoid_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Rafailov et al. (2023), eq. 7: mean over pairs of -log sigmoid(beta * (chosen - rejected log-ratio))."""
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin).mean()


def hinge_aligned_loss(target: torch.Tensor, h_base: torch.Tensor) -> torch.Tensor:
    """mean(relu(stopgrad(target) - h_base)): raise the un-instructed margin to the target margin.

    `hinge` uses the policy's own instructed margin h_pref as target, which rises with h_base, so the
    term never saturates (docs/method.md, "Known behaviour of the aligned loss"). `ref_hinge` uses the
    frozen reference's instructed margin, a fixed target: the term stops once the un-instructed policy
    is as decisive as the instructed base model.
    """
    return torch.relu(target.detach() - h_base).mean()


# form -> (loss function, whether its target is the reference's guided margin)
ALIGNED_LOSSES = {"hinge": (hinge_aligned_loss, False), "ref_hinge": (hinge_aligned_loss, True)}


def aligned_loss(kind: str, target: torch.Tensor, h_base: torch.Tensor) -> torch.Tensor:
    """The aligned-loss form `kind` (see `ALIGNED_LOSSES`); `target` is h_pref or h_ref_pref accordingly."""
    return ALIGNED_LOSSES[kind][0](target, h_base)


def uses_reference_target(kind: str) -> bool:
    """`ref_hinge`: the target is the reference's precomputed margin ("distill" is no margin form)."""
    return kind in ALIGNED_LOSSES and ALIGNED_LOSSES[kind][1]


@dataclass(frozen=True)
class PreferenceStats:
    """Per-pair quantities behind the preference metrics (all detached)."""

    delta_w: torch.Tensor  # logp(y_w|p,x) - logp(y_w|x)
    delta_l: torch.Tensor  # logp(y_l|p,x) - logp(y_l|x)

    @property
    def advantage(self) -> torch.Tensor:
        """h_pref - h_base per pair."""
        return self.delta_w - self.delta_l


def preference_stats(
    base_chosen: torch.Tensor, base_rejected: torch.Tensor, guided_chosen: torch.Tensor, guided_rejected: torch.Tensor
) -> PreferenceStats:
    base_chosen, base_rejected = base_chosen.detach(), base_rejected.detach()
    delta_w = guided_chosen.detach() - base_chosen
    delta_l = guided_rejected.detach() - base_rejected
    return PreferenceStats(delta_w=delta_w, delta_l=delta_l)


def aligned_active(target: torch.Tensor, h_base: torch.Tensor) -> torch.Tensor:
    """1.0 for pairs whose margin is below the target (`target > h_base`): where a hinge form pushes.

    `target` is h_pref for `hinge` and `distill` (`aligned_active_frac` in docs/method.md), h_ref_pref for
    `ref_hinge`. Strict: a pair exactly at its target is not active.
    """
    return (target.detach() > h_base.detach()).float()


def pref_advantage_ratio(advantage: torch.Tensor) -> torch.Tensor:
    """exp(mean(h_pref - h_base)): the geometric mean over pairs of the instruction's odds gain."""
    return advantage.mean().exp()


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows (response tokens) of KL(softmax(teacher) || softmax(student)); the teacher is detached.

    Context distillation (ALIGN_LOSS=distill): the instructed policy is the teacher, the un-instructed one
    the student. Its gradient moves the whole next-token distribution, not only the summed log-prob of
    the two responses, so it is not parallel to DPO's.
    """
    teacher = torch.log_softmax(teacher_logits.detach().float(), dim=-1)
    student = torch.log_softmax(student_logits.float(), dim=-1)
    return (teacher.exp() * (teacher - student)).sum(dim=-1).mean()


def chunked_distill_kl(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, lm_head_weight: torch.Tensor, chunk: int = 256
) -> torch.Tensor:
    """`distill_kl` of the logits `hidden @ lm_head_weight.T`, `chunk` rows at a time.

    Each chunk's logits are recomputed in the backward pass (activation checkpointing), so memory stays at
    one chunk of [chunk, vocab] logits however many response tokens and however large the vocabulary.
    """
    from torch.utils.checkpoint import checkpoint

    def chunk_sum(s: torch.Tensor, t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return distill_kl(s @ w.T, t @ w.T) * s.size(0)

    rows = student_hidden.size(0)
    total = student_hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, rows, chunk):
        s, t = student_hidden[start : start + chunk], teacher_hidden[start : start + chunk].detach()
        total = total + checkpoint(chunk_sum, s, t, lm_head_weight, use_reentrant=False)
    return total / max(rows, 1)
