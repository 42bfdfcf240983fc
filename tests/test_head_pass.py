"""`head_pass`: the base view's one LM-head pass, the DPO label log-probs and the top-K KL from the same logits.

Against the full-logit computation (log_softmax over the whole vocabulary, `losses.topk_token_kl`) in float64,
value and gradient, for K = 16, K = |V| and a peaked student whose rest mass is 1e-13 (where a rest mass taken as
1 - sum(top-K probabilities) cancels to nothing); then inside the trainer against the two-pass path it replaces.
"""

import math

import pytest
import torch

from preference_dpo.head_pass import COLUMNS, HiddenTeacher, TopKTeacher, chunk_scores, head_pass
from preference_dpo.losses import LMHead, topk_teacher, topk_token_kl

from .test_ref_distill import ALPHA, four_pairs, one_sgd_step, pairs, sharp_model  # noqa: F401 (fixtures)
from .test_trl_contract import first_batch, make_trainer, perturb_adapter, training_loss

VOCAB, WIDTH, ROWS = 300, 24, 37  # 37 rows in chunks of 8: the last chunk is short


def full_logit(hidden, head, labels, teacher):
    """The computation the head pass replaces: whole-vocabulary logits, log_softmax, `topk_token_kl`."""
    logits = head.logits(hidden)
    label = torch.log_softmax(logits, -1).gather(-1, labels[:, None]).squeeze(-1)
    return label, topk_token_kl(logits, teacher.ids, teacher.logps, teacher.log_rest)


def problem(k, softcap=None, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(ROWS, WIDTH, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(VOCAB, WIDTH, generator=gen, dtype=torch.float64).requires_grad_()
    bias = torch.randn(VOCAB, generator=gen, dtype=torch.float64).requires_grad_()
    head = LMHead(weight, bias, logit_scale=scale, final_logit_softcapping=softcap)
    labels = torch.randint(VOCAB, (ROWS,), generator=gen)
    teacher_logits = 3 * torch.randn(ROWS, VOCAB, generator=gen, dtype=torch.float64)
    return hidden, head, labels, TopKTeacher(*topk_teacher(teacher_logits.double(), k))


@pytest.mark.parametrize(
    "k, softcap, scale", [(16, None, 1.0), (VOCAB, None, 1.0), (16, 30.0, 0.5)], ids=["top16", "whole-vocab", "capped"]
)
def test_value_and_gradient_equal_the_full_logit_computation(k, softcap, scale):
    hidden, head, labels, teacher = problem(k, softcap, scale)
    weights = torch.randn(2, ROWS, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    scores = head_pass(hidden, head, labels, teacher, chunk=8)
    label, kl = full_logit(hidden, head, labels, teacher)
    torch.testing.assert_close(scores["log_probs"], label, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(scores["kl"], kl, rtol=1e-12, atol=1e-12)
    assert kl.min() > 1e-3  # a real divergence
    if k == VOCAB:  # the whole vocabulary: the exact KL, written out
        log_q, log_s = teacher.logps, torch.log_softmax(head.logits(hidden), -1).gather(-1, teacher.ids)
        torch.testing.assert_close(kl, (log_q.exp() * (log_q - log_s)).sum(-1), rtol=1e-10, atol=1e-12)
    leaves = [hidden, head.weight, head.bias]
    ours = torch.autograd.grad((weights[0] * scores["log_probs"] + weights[1] * scores["kl"]).sum(), leaves)
    theirs = torch.autograd.grad((weights[0] * label + weights[1] * kl).sum(), leaves)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("softcap", [None, 30.0], ids=["plain", "capped"])
def test_an_exact_teacher_gives_the_value_and_gradient_of_token_kl(softcap):
    """A `HiddenTeacher` (distill, exact ref_distill): the teacher's own hidden states through its own head, the
    KL over the whole vocabulary (`losses.token_kl`, written out here), no gradient to the teacher."""
    hidden, head, labels, _ = problem(16, softcap)
    gen = torch.Generator().manual_seed(4)
    teacher_hidden = torch.randn(ROWS, WIDTH, generator=gen, dtype=torch.float64)
    teacher_weight = torch.randn(VOCAB, WIDTH, generator=gen, dtype=torch.float64).requires_grad_()
    teacher_head = LMHead(teacher_weight, final_logit_softcapping=softcap)
    scores = head_pass(hidden, head, labels, HiddenTeacher(teacher_hidden, teacher_head), chunk=8)
    logits = head.logits(hidden)
    log_s, log_q = torch.log_softmax(logits, -1), torch.log_softmax(teacher_head.logits(teacher_hidden).detach(), -1)
    kl = (log_q.exp() * (log_q - log_s)).sum(-1)
    label = log_s.gather(-1, labels[:, None]).squeeze(-1)
    torch.testing.assert_close(scores["log_probs"], label, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(scores["kl"], kl, rtol=1e-12, atol=1e-12)
    assert kl.min() > 1e-2
    weights = torch.randn(2, ROWS, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    leaves = [hidden, head.weight, head.bias]
    ours = torch.autograd.grad((weights[0] * scores["log_probs"] + weights[1] * scores["kl"]).sum(), leaves)
    theirs = torch.autograd.grad((weights[0] * label + weights[1] * kl).sum(), leaves)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    (to_teacher,) = torch.autograd.grad(scores["kl"].sum(), teacher_weight, allow_unused=True)
    assert to_teacher is None  # the teacher is a target: nothing flows back into it
    with pytest.raises(RuntimeError, match="The teacher has 36 response positions; the batch has 37"):
        head_pass(hidden, head, labels, HiddenTeacher(teacher_hidden[1:], teacher_head))


def test_a_peaked_student_whose_rest_mass_is_1e_13_gets_the_exact_gradient():
    """The K ids hold all but 1e-13 of the student's mass. With the identity as LM head the hidden states are the
    logits, so the gradient is the analytic one of docs/method.md: s_j - q_j on the K ids, s_j - q_R s_j / s_R
    outside them. The reverted shortcut (s_R = 1 - sum of the K probabilities) gave a gradient of 1.8e19 here."""
    k, rows = 16, 4
    top = torch.linspace(0, 1, k, dtype=torch.float64)
    rest_logit = math.log((VOCAB - k) / (1e-13 * top.exp().sum().item()))  # the rest's logits, below the K ids'
    z = torch.full((rows, VOCAB), -rest_logit, dtype=torch.float64)
    z[:, :k] = top
    z.requires_grad_()
    teacher_logits = torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    teacher_logits[:, :k] += 8  # the teacher puts most, not all, of its mass on the same ids
    teacher = TopKTeacher(*topk_teacher(teacher_logits, k))
    assert set(teacher.ids[0].tolist()) == set(range(k))
    identity = LMHead(torch.eye(VOCAB, dtype=torch.float64))
    scores = head_pass(z, identity, torch.zeros(rows, dtype=torch.long), teacher, chunk=3)
    (grad,) = torch.autograd.grad(scores["kl"].sum(), z)
    s = torch.softmax(z.detach(), -1)
    s_rest = s[:, k:].sum(-1, keepdim=True)
    torch.testing.assert_close(s_rest, torch.full_like(s_rest, 1e-13), rtol=1e-6, atol=0)
    q = torch.zeros_like(s).scatter(-1, teacher.ids, teacher.logps.exp())
    q_rest = teacher.log_rest.exp()[:, None]
    expected = torch.where(torch.arange(VOCAB) < k, s - q, s - q_rest * s / s_rest)
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-12)
    assert grad.abs().max() < 1.0


def test_trls_per_token_statistics_come_out_as_its_fused_head_gives_them():
    """entropy, mean logit, the label being the argmax, log sum p^2: the fields TRL's DPO trainer logs."""
    hidden, head, labels, teacher = problem(16)
    labels[:5] = head.logits(hidden[:5]).argmax(-1)  # some labels are the top-1
    with torch.no_grad():
        scores = chunk_scores(head.logits(hidden), labels, teacher)
        logp = torch.log_softmax(head.logits(hidden), -1)
    by_name = dict(zip(COLUMNS, scores.unbind(-1), strict=True))
    torch.testing.assert_close(by_name["entropy"], -(logp.exp() * logp).sum(-1))
    torch.testing.assert_close(by_name["mean_logits"], head.logits(hidden).mean(-1))
    assert torch.equal(by_name["is_top1"].bool(), logp.argmax(-1) == labels) and by_name["is_top1"][:5].all()
    torch.testing.assert_close(by_name["log_sum_sq_probs"], (2 * logp).logsumexp(-1))


def test_a_teacher_of_the_wrong_length_is_refused():
    hidden, head, labels, teacher = problem(16)
    with pytest.raises(RuntimeError, match="The teacher has 36 response positions; the batch has 37"):
        head_pass(hidden, head, labels, TopKTeacher(teacher.ids[1:], teacher.logps[1:], teacher.log_rest[1:]))


@pytest.mark.parametrize(
    "embedding, align_loss, top_k",
    [(False, "ref_distill", 16), (True, "ref_distill", 16), (False, "distill", None), (True, "ref_distill", 0)],
    ids=["text", "embedding", "distill-exact", "ref_distill-exact-embedding"],
)
def test_in_the_trainer_one_head_pass_gives_the_two_pass_loss_gradient_and_metrics(
    tiny_model_dir,
    tokenizer,
    pairs,  # noqa: F811 (the fixture)
    tmp_path,
    monkeypatch,
    embedding,  # noqa: F811
    align_loss,
    top_k,
):
    """ref_distill top-16, and the exact teachers (distill's policy, ref_distill's reference with DISTILL_TOP_K=0):
    TRL's fused head is not called for the policy's base-view forward, and the loss, its gradient and every logged
    metric equal those of TRL's head plus a second, separate pass for the KL."""
    from trl.kernels import chunked_logprob

    soft = torch.randn(3, 64, generator=torch.Generator().manual_seed(3)) * 0.05 if embedding else None
    trainer = make_trainer(tiny_model_dir, tokenizer, pairs, tmp_path, alpha=ALPHA, soft=soft,
                           align_loss=align_loss, distill_top_k=top_k)  # fmt: skip
    perturb_adapter(trainer)
    batch, _ = first_batch(trainer)
    calls = []
    original = chunked_logprob.ChunkedLogProbFunction.apply
    monkeypatch.setattr(chunked_logprob.ChunkedLogProbFunction, "apply", lambda *a: calls.append(1) or original(*a))

    def step(head_pass_on):
        slot, trainer._head_pass = trainer._head_pass, (trainer._head_pass if head_pass_on else None)
        try:
            trainer._metrics["train"].clear()
            calls.clear()
            model, loss = training_loss(trainer, batch)
            params = [p for p in model.parameters() if p.requires_grad]
            grads = torch.autograd.grad(loss, params)
            return loss, grads, {k: v[-1] for k, v in trainer._metrics["train"].items()}, len(calls)
        finally:
            trainer._head_pass = slot

    loss, grads, metrics, trl_calls = step(True)
    two_loss, two_grads, two_metrics, two_trl_calls = step(False)
    assert two_trl_calls - trl_calls == 1  # the head pass took the base view's forward from TRL's head
    assert trl_calls == 0 or not top_k  # an exact teacher's own guided pass may go through TRL's head
    assert metrics[f"{align_loss}_loss"] > 1e-4
    assert loss.item() == pytest.approx(two_loss.item(), rel=1e-6)
    for a, b in zip(grads, two_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert metrics.keys() == two_metrics.keys() and "entropy" in metrics and "mean_token_accuracy" in metrics
    for key, value in two_metrics.items():
        if key == "num_tokens":  # TRL's running count over both calls
            continue
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_sum"])
def test_under_gradient_accumulation_the_head_pass_gives_the_two_pass_step(
    sharp_model,  # noqa: F811 (the fixture)
    four_pairs,  # noqa: F811
    tmp_path,
    capsys,
    monkeypatch,
    reduction,
):
    """One SGD step of ref_distill top-16 over 4 pairs in 2 micro-batches of 2: scored in the one head pass (once
    per micro-batch) and in TRL's head plus a second pass, the logged losses and the adapter after the step agree.
    (test_ref_distill checks the head pass's step against one micro-batch of 4.)"""
    import preference_dpo.head_pass as module
    import preference_dpo.trainer as trainer_module

    calls = []
    original = module.head_pass
    monkeypatch.setattr(module, "head_pass", lambda *a, **k: calls.append(1) or original(*a, **k))
    one, one_log = one_sgd_step(sharp_model, four_pairs, tmp_path / "one", reduction, 2, 2, capsys)
    assert len(calls) == 2
    calls.clear()
    monkeypatch.setattr(trainer_module, "install_head_pass", lambda *a: None)
    two, two_log = one_sgd_step(sharp_model, four_pairs, tmp_path / "two", reduction, 2, 2, capsys)
    assert calls == []
    assert one_log["aligned_loss"] > 1e-3
    for key in ("loss", "dpo_loss", "aligned_loss"):
        assert one_log[key] == pytest.approx(two_log[key], rel=1e-5), key
    assert any(value.abs().max() > 0 for name, value in one.items() if "lora_B" in name)
    for name in one:
        torch.testing.assert_close(one[name], two[name], rtol=1e-4, atol=1e-6)
