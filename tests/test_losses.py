"""The loss functions against values worked out by hand."""

import math

import pytest
import torch

from preference_dpo.losses import (
    aligned_active,
    aligned_loss,
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


def test_aligned_loss_dispatches_by_name():
    h_pref, h_base = torch.tensor([1.0, 4.0]), torch.tensor([0.0, 5.0])
    assert aligned_loss("hinge", h_pref, h_base).item() == pytest.approx(0.5)
    with pytest.raises(KeyError):
        aligned_loss("nope", h_pref, h_base)


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
    from preference_dpo.losses import uses_reference_target

    target = torch.tensor([2.0, 2.0])
    h_base = torch.tensor([1.0, 3.0], requires_grad=True)
    loss = aligned_loss("ref_hinge", target, h_base)
    assert loss.item() == pytest.approx(0.5)
    loss.backward()
    assert torch.equal(h_base.grad, torch.tensor([-0.5, 0.0]))
    assert uses_reference_target("ref_hinge") and not uses_reference_target("hinge")


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


def test_chunked_distill_equals_unchunked_in_value_and_gradient():
    from preference_dpo.losses import LMHead, chunked_distill_kl, distill_kl

    gen = torch.Generator().manual_seed(0)
    student = torch.randn(7, 5, generator=gen, requires_grad=True)
    teacher = torch.randn(7, 5, generator=gen)
    weight = torch.randn(11, 5, generator=gen, requires_grad=True)
    full = distill_kl(student @ weight.T, teacher @ weight.T)
    chunked = chunked_distill_kl(student, teacher, LMHead(weight), chunk=3)  # 3 + 3 + 1 rows
    assert chunked.item() == pytest.approx(full.item(), rel=1e-6)
    grads_full = torch.autograd.grad(full, (student, weight))
    grads_chunked = torch.autograd.grad(chunked, (student, weight))
    for a, b in zip(grads_full, grads_chunked, strict=True):
        torch.testing.assert_close(a, b)
