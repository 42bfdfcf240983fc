"""The loss functions against values worked out by hand."""

import math

import pytest
import torch

from preference_dpo.losses import (
    aligned_active,
    dpo_sigmoid_loss,
    hinge_aligned_loss,
    pref_advantage_ratio,
    preference_stats,
)


def test_dpo_loss_is_ln2_when_policy_equals_reference():
    logps = torch.tensor([-3.0, -7.5, -1.25])
    loss = dpo_sigmoid_loss(logps, logps - 2.0, logps, logps - 2.0, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)


def test_dpo_loss_hand_computed():
    """Pair 1: margin = (-1 - -2) - (-3 - -2) = 2, beta*m = 0.2; pair 2: margin = (-4 - -4) - (-1 - -3) = -2.

    loss = mean(-log sigmoid(0.2), -log sigmoid(-0.2)) = mean(0.598139, 0.798139) = 0.698139
    """
    loss = dpo_sigmoid_loss(
        torch.tensor([-1.0, -4.0]),
        torch.tensor([-3.0, -1.0]),
        torch.tensor([-2.0, -4.0]),
        torch.tensor([-2.0, -3.0]),
        beta=0.1,
    )
    expected = (-math.log(1 / (1 + math.exp(-0.2))) - math.log(1 / (1 + math.exp(0.2)))) / 2
    assert expected == pytest.approx(0.698139, abs=1e-6)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_hinge_hand_computed_and_gradient_only_through_base():
    """h_pref - h_base = [2, -2, 0] -> relu = [2, 0, 0] -> mean 2/3; d/dh_base = -[1, 0, 0]/3 (relu'(0) = 0)."""
    h_pref = torch.tensor([3.0, 0.0, 1.0], requires_grad=True)
    h_base = torch.tensor([1.0, 2.0, 1.0], requires_grad=True)
    loss = hinge_aligned_loss(h_pref, h_base)
    assert loss.item() == pytest.approx(2 / 3)
    loss.backward()
    assert torch.allclose(h_base.grad, torch.tensor([-1 / 3, 0.0, 0.0]))
    assert h_pref.grad is None  # stop-gradient on the guided margin


def test_preference_stats_and_ratio():
    """delta_w = [ln 2 + 0, ...]: pick guided - base so that advantages are ln 2 and ln 8 -> ratio exp(ln 4) = 4."""
    base_chosen, base_rejected = torch.tensor([-5.0, -6.0]), torch.tensor([-7.0, -8.0])
    guided_chosen = base_chosen + torch.tensor([math.log(2), math.log(8) + 1.0])
    guided_rejected = base_rejected + torch.tensor([0.0, 1.0])
    stats = preference_stats(base_chosen, base_rejected, guided_chosen, guided_rejected)
    assert torch.allclose(stats.delta_w, torch.tensor([math.log(2), math.log(8) + 1.0]))
    assert torch.allclose(stats.delta_l, torch.tensor([0.0, 1.0]))
    assert torch.allclose(stats.advantage, torch.tensor([math.log(2), math.log(8)]))
    h_base, h_pref = base_chosen - base_rejected, guided_chosen - guided_rejected
    assert torch.equal(aligned_active(h_pref, h_base), torch.tensor([1.0, 1.0]))
    assert pref_advantage_ratio(stats.advantage).item() == pytest.approx(4.0)


def test_active_fraction_counts_pairs_the_hinge_pushes():
    active = aligned_active(torch.tensor([1.0, -1.0, 0.0, 2.0]), torch.zeros(4))  # h_pref, h_base
    assert active.mean().item() == pytest.approx(0.5)  # strict: a zero advantage is not active


def test_ref_hinge_uses_a_fixed_target_and_saturates():
    """target (reference's instructed margin) = [2, 2]; h_base = [1, 3] -> relu([1, -1]) = [1, 0] -> 0.5.

    Once h_base passes the target the pair contributes nothing (gradient 0), unlike `hinge`, whose target
    is the policy's own instructed margin and moves with it.
    """
    target = torch.tensor([2.0, 2.0])
    h_base = torch.tensor([1.0, 3.0], requires_grad=True)
    loss = hinge_aligned_loss(target, h_base)
    assert loss.item() == pytest.approx(0.5)
    loss.backward()
    assert torch.equal(h_base.grad, torch.tensor([-0.5, 0.0]))


def test_distill_kl_hand_computed_and_gradient_only_through_the_student():
    """q = softmax([0, ln 3]) = [1/4, 3/4]; p = softmax([0, 0]) = [1/2, 1/2].

    KL(q || p) = 1/4 ln(1/2) + 3/4 ln(3/2) = -0.173287 + 0.304099 = 0.130812; d/d student logits = p - q.
    """
    from preference_dpo.losses import distill_kl

    teacher = torch.tensor([[0.0, math.log(3)]], requires_grad=True)
    student = torch.tensor([[0.0, 0.0]], requires_grad=True)
    loss = distill_kl(student, teacher)
    assert loss.item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), abs=1e-6)
    assert loss.item() == pytest.approx(0.130812, abs=1e-6)
    loss.backward()
    assert torch.allclose(student.grad, torch.tensor([[0.25, -0.25]]))
    assert teacher.grad is None
    assert distill_kl(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)


def test_chunked_rows_equal_unchunked_in_value_and_gradient():
    """The per-position KL through an LM head, 3 rows at a time (recomputed in backward), equals one pass."""
    from preference_dpo.losses import chunked_rows, token_kl

    gen = torch.Generator().manual_seed(0)
    student = torch.randn(7, 5, generator=gen, requires_grad=True)
    teacher = torch.randn(7, 5, generator=gen)
    weight = torch.randn(11, 5, generator=gen, requires_grad=True)
    full = token_kl(student @ weight.T, teacher @ weight.T)
    chunked = chunked_rows(lambda s, t: token_kl(s @ weight.T, t @ weight.T), student, teacher, chunk=3)  # 3 + 3 + 1
    torch.testing.assert_close(chunked, full)
    grads_full = torch.autograd.grad(full.sum(), (student, weight))
    grads_chunked = torch.autograd.grad(chunked.sum(), (student, weight))
    for a, b in zip(grads_full, grads_chunked, strict=True):
        torch.testing.assert_close(a, b)


def test_token_kl_is_the_per_row_distill_kl():
    from preference_dpo.losses import distill_kl, token_kl

    gen = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen)
    assert token_kl(student, teacher).mean().item() == pytest.approx(distill_kl(student, teacher).item(), rel=1e-6)


def test_topk_kl_hand_computed_value_and_gradient():
    """V = 3, teacher q = [1/2, 1/3, 1/6], student s = [1/3, 1/3, 1/3] (logits 0).

    K = 1: S = {0}, q_R = 1/2, s_R = 2/3:
      KL_1 = 1/2 ln((1/2)/(1/3)) + 1/2 ln((1/2)/(2/3)) = 1/2 ln(9/8) = 0.0588915
      d/dz = [s_0 - q_0, s_1 - q_R s_1/s_R, s_2 - q_R s_2/s_R] = [-1/6, 1/12, 1/12]
    K = 2 (one id left in the bucket) and K = 3 are the exact KL:
      1/2 ln(3/2) + 1/3 ln(1) + 1/6 ln(1/2) = 0.202733 - 0.115525 = 0.087208, gradient s - q = [-1/6, 0, 1/6]
    """
    from preference_dpo.losses import topk_teacher, topk_token_kl

    teacher_logits = torch.log(torch.tensor([[1 / 2, 1 / 3, 1 / 6]]))
    expected = {1: (0.5 * math.log(9 / 8), [-1 / 6, 1 / 12, 1 / 12]), 2: (0.087208, [-1 / 6, 0.0, 1 / 6])}
    expected[3] = expected[2]
    assert expected[1][0] == pytest.approx(0.0588915, abs=1e-7)
    assert 0.5 * math.log(1.5) + math.log(0.5) / 6 == pytest.approx(0.087208, abs=1e-6)
    for k, (value, gradient) in expected.items():
        ids, logps, log_rest = topk_teacher(teacher_logits, k)
        student = torch.zeros(1, 3, requires_grad=True)
        kl = topk_token_kl(student, ids, logps, log_rest)
        assert kl.item() == pytest.approx(value, abs=1e-6), k
        kl.sum().backward()
        torch.testing.assert_close(student.grad, torch.tensor([gradient]), atol=1e-6, rtol=0)


def test_topk_kl_with_k_equal_to_the_vocabulary_is_the_exact_kl():
    """Every id kept: the bucket is empty (q_R = s_R = 0, floored), and value and gradient are exact; no NaN."""
    from preference_dpo.losses import LOG_MASS_FLOOR, token_kl, topk_teacher, topk_token_kl

    gen = torch.Generator().manual_seed(2)
    student = (torch.randn(5, 11, generator=gen) * 3).requires_grad_()
    teacher = torch.randn(5, 11, generator=gen) * 3
    ids, logps, log_rest = topk_teacher(teacher, 11)
    assert torch.allclose(log_rest, torch.full((5,), LOG_MASS_FLOOR))
    approx = topk_token_kl(student, ids, logps, log_rest)
    exact = token_kl(student, teacher)
    torch.testing.assert_close(approx, exact, atol=1e-6, rtol=1e-5)
    (g_approx,) = torch.autograd.grad(approx.sum(), student)
    (g_exact,) = torch.autograd.grad(exact.sum(), student)
    assert torch.isfinite(g_approx).all()
    torch.testing.assert_close(g_approx, g_exact, atol=1e-6, rtol=1e-5)


def test_topk_kl_matches_an_independent_float64_computation():
    """KL_K from probabilities (1 - sum, no log space), and its closed-form gradient
    s_j - q_j (j in S), s_j - q_R s_j / s_R (j outside), against the log-space float32 function."""
    import numpy as np

    from preference_dpo.losses import topk_teacher, topk_token_kl

    gen = torch.Generator().manual_seed(3)
    student = torch.randn(6, 9, generator=gen) * 2
    teacher = torch.randn(6, 9, generator=gen) * 2
    k = 3

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    q, s = softmax(teacher.double().numpy()), softmax(student.double().numpy())
    top = np.argsort(-q, axis=-1)[:, :k]
    in_s = np.zeros_like(q, dtype=bool)
    np.put_along_axis(in_s, top, True, axis=-1)
    q_rest, s_rest = 1 - (q * in_s).sum(-1), 1 - (s * in_s).sum(-1)
    want = (np.where(in_s, q * np.log(q / s), 0.0)).sum(-1) + q_rest * np.log(q_rest / s_rest)
    want_grad = np.where(in_s, s - q, s - (q_rest / s_rest)[:, None] * s)

    ids, logps, log_rest = topk_teacher(teacher, k)
    assert sorted(ids[0].tolist()) == sorted(top[0].tolist())
    np.testing.assert_allclose(log_rest.exp().numpy(), q_rest, rtol=1e-5)
    z = student.clone().requires_grad_()
    got = topk_token_kl(z, ids, logps, log_rest)
    got.sum().backward()
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(z.grad.numpy(), want_grad, rtol=1e-4, atol=1e-6)
    assert (got.detach().numpy() <= token_kl_np(q, s) + 1e-6).all()  # merging ids into a bucket never adds KL


def token_kl_np(q, s):
    import numpy as np

    return (q * np.log(q / s)).sum(-1)


def test_reduce_token_kl_hand_computed():
    """KL at 5 positions [1, 2, 3, 4, 5] over responses of 2, 3 and 0 positions.

    token_mean = 15 / 5 = 3, gradient 1/5 each; sequence_sum = mean(1+2, 3+4+5, 0) = 15 / 3 = 5, gradient 1/3 each.
    """
    from preference_dpo.losses import reduce_token_kl

    lengths = torch.tensor([2, 3, 0])
    for reduction, value, grad in (("token_mean", 3.0, 0.2), ("sequence_sum", 5.0, 1 / 3)):
        per_token = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], requires_grad=True)
        loss = reduce_token_kl(per_token, lengths, reduction)
        assert loss.item() == pytest.approx(value)
        loss.backward()
        torch.testing.assert_close(per_token.grad, torch.full((5,), grad))
    # token_mean over a step of 10 positions, of which this micro-batch holds 5: 15 / 10, gradient 1/10 each
    per_token = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], requires_grad=True)
    loss = reduce_token_kl(per_token, lengths, "token_mean", num_tokens=torch.tensor(10.0))
    loss.backward()
    assert loss.item() == pytest.approx(1.5)
    torch.testing.assert_close(per_token.grad, torch.full((5,), 0.1))
    with pytest.raises(ValueError, match="unknown distill reduction"):
        reduce_token_kl(per_token, lengths, "mean")


def test_reverse_kl_and_the_generalised_jsd_hand_computed_with_the_gradient_through_the_student():
    """s = softmax([0, 0]) = [1/2, 1/2], t = softmax([0, ln 3]) = [1/4, 3/4].

    Reverse KL(s || t) = 1/2 ln(2) + 1/2 ln(2/3) = 0.143841; d/dz_j = s_j (log s_j - log t_j - KL):
    [1/2 (ln 2 - 0.143841), 1/2 (ln(2/3) - 0.143841)] = [0.274653, -0.274653].
    JSD at beta 1/2: m = [3/8, 5/8]; KL(t || m) = 1/4 ln(2/3) + 3/4 ln(6/5) = 0.035372, KL(s || m) = 1/2 ln(4/3)
    + 1/2 ln(4/5) = 0.032287; 1/2 (0.035372 + 0.032287) = 0.033830.
    """
    from preference_dpo.losses import generalized_jsd, reverse_kl

    student = torch.zeros(1, 2, requires_grad=True)
    teacher = torch.tensor([[0.0, math.log(3)]], requires_grad=True)
    value = reverse_kl(student, teacher)
    assert value.item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), abs=1e-6)
    value.sum().backward()
    assert student.grad[0].tolist() == pytest.approx([0.274653, -0.274653], abs=1e-5)
    assert teacher.grad is None  # the teacher is detached
    jsd = generalized_jsd(torch.zeros(1, 2), torch.tensor([[0.0, math.log(3)]]), 0.5)
    assert jsd.item() == pytest.approx(0.033830, abs=1e-5)
    with pytest.raises(ValueError, match="0 < beta < 1"):
        generalized_jsd(torch.zeros(1, 2), torch.zeros(1, 2), 1.0)


def test_the_on_policy_steps_are_spread_evenly_and_counted_exactly():
    from preference_dpo.losses import steps_on_policy

    assert [steps_on_policy(s, 0.25) for s in range(8)] == [False, False, False, True] * 2
    assert all(steps_on_policy(s, 1.0) for s in range(5))
    assert sum(steps_on_policy(s, 0.3) for s in range(100)) == 30
