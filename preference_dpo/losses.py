"""The preference-guided DPO objective as pure tensor functions (docs/method.md, "The loss").

Inputs are per-pair summed log-probs of the response tokens, shape [batch]:

    h_base = logp_theta(y_w | x)   - logp_theta(y_l | x)         (with gradient)
    h_pref = logp_theta(y_w | p,x) - logp_theta(y_l | p,x)       (no gradient: the guided view)
    h_ref_pref = logp_ref(y_w | p,x) - logp_ref(y_l | p,x)       (the frozen reference, guided view)
    dpo_loss     = mean(-log sigmoid(beta * [(logp(y_w|x) - ref(y_w|x)) - (logp(y_l|x) - ref(y_l|x))]))
    aligned_loss = mean(relu(stopgrad(h_pref) - h_base))          ("hinge", the user's method)
                 = mean(relu(h_ref_pref - h_base))                  ("ref_hinge")
    loss         = dpo_loss + alpha * aligned_loss

The distillation forms compare next-token distributions at every response position t ("Forms of the aligned
loss" in docs/method.md): `distill` against the policy's own instructed distribution,
`ref_distill` against the frozen reference's, exactly (`token_kl`) or through its top-K ids and one bucket
for the rest of the mass (`topk_token_kl`); `reduce_token_kl` turns the per-position values into the loss.

The trainer takes `dpo_loss` from TRL (any TRL `loss_type`); `dpo_sigmoid_loss` here is the reference
formula the tests hold TRL's value to.
"""

from __future__ import annotations

import math
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
    `ref_hinge` and `ref_distill`. Strict: a pair exactly at its target is not active.
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


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(teacher) || softmax(student)) of every row (response position), shape [rows]; the teacher
    is detached. `distill_kl` is its mean."""
    teacher = torch.log_softmax(teacher_logits.detach().float(), dim=-1)
    student = torch.log_softmax(student_logits.float(), dim=-1)
    return (teacher.exp() * (teacher - student)).sum(dim=-1)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(student) || softmax(teacher)) of every row, shape [rows]; the teacher is detached.

    The on-policy form's default divergence: on the student's own samples it is mode-seeking, so the student is
    pushed off what the teacher finds unlikely rather than made to cover all of the teacher's mass.
    """
    teacher = torch.log_softmax(teacher_logits.detach().float(), dim=-1)
    student = torch.log_softmax(student_logits.float(), dim=-1)
    return (student.exp() * (student - teacher)).sum(dim=-1)


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float) -> torch.Tensor:
    """GKD's generalised Jensen-Shannon divergence of every row (Agarwal et al. 2023), the teacher detached:
    `beta KL(t || m) + (1 - beta) KL(s || m)` with the mixture `m = beta t + (1 - beta) s`; 0 < beta < 1
    (beta -> 0 tends to 0 as the mixture becomes the student; 0.5 is the symmetric JSD)."""
    if not 0.0 < beta < 1.0:
        raise ValueError(f"the generalised JSD needs 0 < beta < 1; got {beta}")
    teacher = torch.log_softmax(teacher_logits.detach().float(), dim=-1)
    student = torch.log_softmax(student_logits.float(), dim=-1)
    mixture = torch.logaddexp(teacher + math.log(beta), student + math.log(1.0 - beta))
    to_mixture_t = (teacher.exp() * (teacher - mixture)).sum(dim=-1)
    to_mixture_s = (student.exp() * (student - mixture)).sum(dim=-1)
    return beta * to_mixture_t + (1.0 - beta) * to_mixture_s


def steps_on_policy(step: int, fraction: float) -> bool:
    """Whether optimizer step `step` (0-based) generates: evenly spread, `fraction` of the steps, the same on
    every rank and after a resume (GKD draws this at random; a fixed pattern keeps runs comparable)."""
    return math.floor((step + 1) * fraction) > math.floor(step * fraction)


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32, or float64 if it is (so the tests' float64 reference computations stay exact)."""
    return x if x.dtype == torch.float64 else x.float()


@dataclass(frozen=True)
class LMHead:
    """A causal LM's output layer as TRL's fused LM head applies it when it scores the base view:
    `logits = softcap(logit_scale * (hidden @ weight.T + bias))`, with `softcap(z) = c * tanh(z / c)` for
    models that cap their final logits (Gemma-2/3) and `logit_scale` for those that scale them (Cohere,
    Granite, Falcon-H1, ...). Logits come out in float32, the scale and cap applied in float32 as TRL does.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    logit_scale: float = 1.0
    final_logit_softcapping: float | None = None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        z = at_least_fp32(F.linear(hidden, self.weight, self.bias))
        if self.logit_scale != 1.0:
            z = z * self.logit_scale
        if self.final_logit_softcapping is not None:
            z = self.final_logit_softcapping * torch.tanh(z / self.final_logit_softcapping)
        return z


# The smallest probability mass the top-K bucket takes: log(1e-30). It keeps log q_R and log s_R finite when
# the K ids hold (nearly) all the mass, K = |V| included, where the bucket term is then 1e-30 * 0 = 0.
LOG_MASS_FLOOR = math.log(1e-30)


def log_rest_mass(log_probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log(1 - sum of the probabilities of `ids`) per row, clamped smoothly at `LOG_MASS_FLOOR`.

    Computed as the logsumexp of the log-probs outside `ids` (no cancellation in 1 - sum when the K ids hold
    almost all the mass), plus the floor: log(R + 1e-30).
    """
    masked = log_probs.scatter(-1, ids, float("-inf"))
    floor = torch.full_like(masked[..., 0], LOG_MASS_FLOOR)
    return torch.logaddexp(masked.logsumexp(dim=-1), floor)


@torch.no_grad()
def topk_teacher(teacher_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's K most likely ids per row, their log-probs ([rows, K] each) and log q_R ([rows])."""
    log_probs = torch.log_softmax(at_least_fp32(teacher_logits), dim=-1)
    top_logps, ids = log_probs.topk(k, dim=-1)
    return ids, top_logps, log_rest_mass(log_probs, ids)


def topk_token_kl(
    student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logps: torch.Tensor, teacher_log_rest: torch.Tensor
) -> torch.Tensor:
    """KL_K per row: the KL between teacher and student over the teacher's top-K ids plus one bucket for the rest.

    With S the K ids, q the teacher's and s the student's probabilities (docs/method.md, "Top-K teacher"):
    `KL_K = sum_{v in S} q_v (log q_v - log s_v) + q_R (log q_R - log s_R)`, q_R = 1 - sum_S q_v and
    s_R = 1 - sum_S s_v, both in log space and floored at 1e-30 (`log_rest_mass`). K = |V| is the exact KL.
    Its gradient in the student logits z_j is `s_j - q_j` for j in S and `s_j - q_R s_j / s_R` outside it.
    """
    student = torch.log_softmax(at_least_fp32(student_logits), dim=-1)
    ids = teacher_ids.long()
    q_top, q_rest = at_least_fp32(teacher_logps.detach()), at_least_fp32(teacher_log_rest.detach())
    top = (q_top.exp() * (q_top - student.gather(-1, ids))).sum(dim=-1)
    return top + q_rest.exp() * (q_rest - log_rest_mass(student, ids))


DISTILL_REDUCTIONS = ("token_mean", "sequence_sum")


def reduce_token_kl(
    per_token: torch.Tensor, lengths: torch.Tensor, reduction: str, num_tokens: float | torch.Tensor | None = None
) -> torch.Tensor:
    """The distillation loss from the KL at every response position (rows: response after response).

    `token_mean`: the sum over all positions divided by `num_tokens` (default: the batch's positions, the mean).
    The trainer passes the optimizer step's positions on all ranks over its micro-batches x ranks, so that the
    average of the micro-batches' losses, as the Trainer and the data-parallel backend take it, is the step's
    token mean (transformers' `num_items_in_batch`). `sequence_sum`: each response's sum, then the mean over the
    responses (`lengths`: positions per response; an empty response counts as 0), the scale of DPO's summed
    log-probs, so a trait decided at one token is not divided by the response length.
    """
    if reduction == "token_mean":
        return per_token.sum() / (max(per_token.numel(), 1) if num_tokens is None else num_tokens)
    if reduction == "sequence_sum":
        response = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
        sums = per_token.new_zeros(lengths.numel()).index_add(0, response, per_token)
        return sums.mean()
    raise ValueError(f"unknown distill reduction {reduction!r}; expected one of {DISTILL_REDUCTIONS}")


def chunked_rows(fn, *rows: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """`fn(*row_chunks)` ([n] per chunk of n rows) over `chunk` rows at a time, concatenated.

    Each chunk is recomputed in the backward pass (activation checkpointing), so the [chunk, vocab] logits
    that `fn` makes from hidden states are alive for one chunk at a time, whatever the number of response
    positions and the vocabulary size.
    """
    from torch.utils.checkpoint import checkpoint

    total = rows[0].size(0)
    parts = [
        checkpoint(fn, *(r[start : start + chunk] for r in rows), use_reentrant=False)
        for start in range(0, total, chunk)
    ]
    return torch.cat(parts) if parts else rows[0].new_zeros(0, dtype=torch.float32)


def chunked_divergence(student: torch.Tensor, teacher: torch.Tensor, student_head: LMHead, teacher_head: LMHead,
                       divergence=token_kl) -> torch.Tensor:  # fmt: skip
    """`divergence` (default `token_kl`) between the next-token distributions of paired rows of final hidden
    states, each through its own LM head, `chunked_rows` at a time: shape [rows]."""
    return chunked_rows(lambda s, t: divergence(student_head.logits(s), teacher_head.logits(t)), student, teacher)


# --- the learned preference prompt (STAGE=ptune, docs/method.md "Learned preference prompt") ---------------


def prompt_dpo_loss(
    prompted_chosen: torch.Tensor,
    prompted_rejected: torch.Tensor,
    plain_chosen: torch.Tensor,
    plain_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """PTUNE_OBJECTIVE=dpo: DPO with the soft-prompted frozen model as the policy and the same model without
    the prompt as the reference, so that the prompt learns the direction that separates the pairs:
    mean(-log sigmoid(beta * [(logp(y_w|E,x) - logp(y_w|x)) - (logp(y_l|E,x) - logp(y_l|x))])).
    """
    return dpo_sigmoid_loss(prompted_chosen, prompted_rejected, plain_chosen, plain_rejected, beta)


def prompt_sft_loss(prompted_chosen: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """PTUNE_OBJECTIVE=sft: mean over pairs of -logp(y_w | E,x) / |y_w|, the chosen responses' per-token NLL."""
    return (-prompted_chosen / chosen_lengths.clamp(min=1)).mean()


def preference_accuracy_and_margin(chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fraction of pairs with logp(y_w) > logp(y_l), mean of logp(y_w) - logp(y_l)) of one view, detached."""
    margin = (chosen - rejected).detach().float()
    return (margin > 0).float().mean(), margin.mean()
