"""One pass over the LM head for the base view: TRL's DPO log-probs and the distillation KL together.

The distillation forms need, at every response position of the base view, the label's log-prob (TRL's DPO
loss) and the KL from the teacher's next-token distribution to the student's. Both come from the same logits.
TRL's fused head projects the hidden states once for the labels; scoring the KL from the same hidden states
again would project them a second time, forward and backward. `install` replaces TRL's fused forward of the
policy, for the batches the trainer hands a teacher, with one chunked pass that computes both (docs/method.md,
"Top-K teacher"). The teacher is either

- `TopKTeacher`, precomputed (`ref_distill` with --distill_top_k): per chunk of rows, the logits z, their
  logsumexp over the vocabulary, z at the label and at the K ids, and the logsumexp of z with the K ids masked
  out: the rest mass in log space, never formed as `1 - sum`; or
- `HiddenTeacher`, the teacher's final hidden states and LM head (`distill`, exact `ref_distill`): per chunk, the
  teacher's logits from the same rows, without gradient, and the exact KL over the whole vocabulary.

Each chunk is recomputed in the backward pass (`losses.chunked_rows`), so the [tokens, vocab] logits are never
materialised, and a chunk's logits live only while that chunk is scored.

Batches without a teacher, and forwards the pass does not cover (ZeRO-3's sharded head, pre-shifted labels, MoE
router losses), go through TRL's forward unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from trl.trainer.utils import FusedCausalLMOutput

from .losses import LOG_MASS_FLOOR, LMHead, at_least_fp32, chunked_rows

# Rows per chunk: [256, 152k] float32 logits are 155 MB, a few of them alive at once within a chunk.
HEAD_PASS_CHUNK = 256


@dataclass(frozen=True)
class TopKTeacher:
    """The precomputed teacher at every response position of the base view, rows in its order."""

    ids: torch.Tensor  # [rows, K]
    logps: torch.Tensor  # [rows, K]
    log_rest: torch.Tensor  # [rows]


@dataclass(frozen=True)
class HiddenTeacher:
    """A teacher scored now, exactly: its final hidden states at every response position of the base view (rows in
    its order, no gradient) and the LM head that turns them into logits."""

    hidden: torch.Tensor  # [rows, hidden]
    head: LMHead

    @property
    def rows(self) -> int:
        return self.hidden.size(0)


Teacher = TopKTeacher | HiddenTeacher


# The columns of a chunk's scores: the two losses' terms (with gradient), then the per-token statistics TRL's
# DPO trainer logs from its fused head (`entropy`, `logits/*`, `mean_token_accuracy`; `log_sum_sq_probs` for
# WPO weights), computed from detached logits so that the backward pass skips them.
COLUMNS = ("log_probs", "kl", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")


def topk_kl(z: torch.Tensor, lse: torch.Tensor, teacher: TopKTeacher) -> torch.Tensor:
    """KL_K(teacher || softmax(z)) per row (`losses.topk_token_kl`), from z and two logsumexps over the
    vocabulary, without a [rows, vocab] log-softmax: log s_v = z_v - lse, and the student's rest mass is
    log s_R = logsumexp(z with the K ids at -inf) - lse, floored like `losses.log_rest_mass`."""
    ids = teacher.ids.long()
    student_top = z.gather(-1, ids) - lse[:, None]
    rest = z.scatter(-1, ids, float("-inf")).logsumexp(dim=-1) - lse
    student_rest = torch.logaddexp(rest, torch.full_like(rest, LOG_MASS_FLOOR))
    q_top, q_rest = at_least_fp32(teacher.logps.detach()), at_least_fp32(teacher.log_rest.detach())
    return (q_top.exp() * (q_top - student_top)).sum(dim=-1) + q_rest.exp() * (q_rest - student_rest)


def exact_kl(z: torch.Tensor, lse: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(teacher_logits) || softmax(z)) per row, over the whole vocabulary (`losses.token_kl`)."""
    q = torch.log_softmax(at_least_fp32(teacher_logits.detach()), dim=-1)
    return (q.exp() * (q - (z - lse[:, None]))).sum(dim=-1)


def chunk_scores(z: torch.Tensor, labels: torch.Tensor, teacher: TopKTeacher | torch.Tensor) -> torch.Tensor:
    """[rows, len(COLUMNS)] from the logits z of a chunk: log softmax(z) at `labels`, the KL from `teacher` (a
    top-K teacher's rows, `topk_kl`, or the teacher's logits, `exact_kl`) to softmax(z), and TRL's statistics."""
    lse = z.logsumexp(dim=-1)
    label = z.gather(-1, labels[:, None]).squeeze(-1) - lse
    kl = topk_kl(z, lse, teacher) if isinstance(teacher, TopKTeacher) else exact_kl(z, lse, teacher)
    with torch.no_grad():
        zd, lsed = z.detach(), lse.detach()
        entropy = lsed - (torch.softmax(zd, dim=-1) * zd).sum(dim=-1)
        is_top1 = (zd.argmax(dim=-1) == labels).float()  # argmax takes the first maximum, as TRL's kernel counts ties
        log_sum_sq = (2 * zd).logsumexp(dim=-1) - 2 * lsed
        stats = torch.stack([entropy, zd.mean(dim=-1), is_top1, log_sum_sq], dim=-1)
    return torch.cat([torch.stack([label, kl], dim=-1), stats], dim=-1)


def head_pass(hidden: torch.Tensor, head: LMHead, labels: torch.Tensor, teacher: Teacher,
              chunk: int = HEAD_PASS_CHUNK) -> dict[str, torch.Tensor]:  # fmt: skip
    """`COLUMNS` ([rows] each) of `hidden` ([rows, hidden]) through `head`, one chunk of rows at a time, each
    recomputed in the backward pass (a `HiddenTeacher`'s logits too: keeping them would keep [rows, vocab])."""
    rows = teacher.ids.size(0) if isinstance(teacher, TopKTeacher) else teacher.rows
    if rows != hidden.size(0):
        raise RuntimeError(f"The teacher has {rows} response positions; the batch has {hidden.size(0)}.")
    if isinstance(teacher, TopKTeacher):
        scores = chunked_rows(
            lambda h, y, i, lp, r: chunk_scores(head.logits(h), y, TopKTeacher(i, lp, r)),
            hidden, labels, teacher.ids, teacher.logps, teacher.log_rest, chunk=chunk,
        )  # fmt: skip
    else:

        def exact_chunk(h, y, t):
            with torch.no_grad():
                teacher_logits = teacher.head.logits(t)
            return chunk_scores(head.logits(h), y, teacher_logits)

        scores = chunked_rows(exact_chunk, hidden, labels, teacher.hidden, chunk=chunk)
    if scores.dim() == 1:  # no rows at all
        scores = scores.new_zeros(0, len(COLUMNS))
    return dict(zip(COLUMNS, scores.unbind(dim=-1), strict=True))


class HeadPassSlot:
    """Where the trainer hands the policy's next fused forward a teacher, and reads back the KL it scored."""

    def __init__(self) -> None:
        self._teacher: Teacher | None = None
        self.kl: torch.Tensor | None = None

    @contextlib.contextmanager
    def serving(self, teacher: Teacher | None) -> Iterator[HeadPassSlot]:
        """Within the block, the first fused forward of the policy (TRL's base-view forward; the reference's, if
        any, comes after it) runs the head pass with `teacher`; `kl` holds its per-row KL afterwards (None if no
        forward took it)."""
        self._teacher, self.kl = teacher, None
        try:
            yield self
        finally:
            self._teacher = None

    def take(self) -> Teacher | None:
        teacher, self._teacher = self._teacher, None
        return teacher


def install(causal_lm, head_of) -> HeadPassSlot:
    """Wrap `causal_lm`'s forward, already patched by TRL's `add_fused_lm_head`, so that a fused forward with a
    teacher in the returned slot scores the labels and the KL in one head pass. `head_of(causal_lm)` gives the
    `LMHead` (looked up on each call: PEFT and DeepSpeed replace modules after this)."""
    slot = HeadPassSlot()
    trl_forward = causal_lm.forward

    @functools.wraps(type(causal_lm).forward)  # `generate` validates its kwargs against this signature
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        teacher = slot.take() if fused_lm_head else None
        if teacher is None or shift_labels is not None or kwargs.get("output_router_logits"):
            return trl_forward(
                *args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                num_items_in_batch=num_items_in_batch, **kwargs,
            )  # fmt: skip
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        labels = labels[:, 1:].to(hidden.device)
        mask = labels != -100
        scores = head_pass(hidden[mask], head_of(self), labels[mask], teacher)
        slot.kl = scores.pop("kl")
        # back to [batch, positions], 0 where no label is scored, as TRL's forward returns them
        per_token = {name: x.new_zeros(mask.shape).masked_scatter(mask, x) for name, x in scores.items()}
        per_token["is_top1"] = per_token["is_top1"].bool()
        log_probs = per_token["log_probs"]
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return FusedCausalLMOutput(loss=loss, label_mask=mask, **per_token)

    causal_lm.forward = types.MethodType(forward, causal_lm)
    return slot
