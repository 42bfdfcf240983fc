"""The method benchmark's synthetic world, scorer and matched-step rule (bench/method)."""

from __future__ import annotations

import math
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from bench.method import evaluate, report, world


def test_instruction_makes_both_traits_hold_and_without_it_each_is_a_fair_independent_coin():
    rows = world.pretraining_examples(8000, seed=0)
    instructed = [text for _, flag, text in rows if flag]
    plain = [text for _, flag, text in rows if not flag]
    assert all(world.is_concise(t) and world.is_polite(t) for t in instructed)
    joint = Counter((world.is_concise(t), world.is_polite(t)) for t in plain)
    for cell in ((True, True), (True, False), (False, True), (False, False)):
        assert joint[cell] / len(plain) == pytest.approx(0.25, abs=0.02)
    assert len(instructed) / len(rows) == pytest.approx(0.5, abs=0.02)
    assert {q.topic for q, _, _ in rows} == set(world.TOPICS)  # every fact is pretrained


def test_pairs_contrast_trait_one_only():
    pairs = world.preference_pairs(world.train_questions(), 8, seed=1)
    chosen = [p["chosen"][0]["content"] for p in pairs]
    rejected = [p["rejected"][0]["content"] for p in pairs]
    assert all(world.is_concise(c) and not world.is_concise(r) for c, r in zip(chosen, rejected, strict=True))
    polite_w = sum(map(world.is_polite, chosen)) / len(pairs)
    polite_l = sum(map(world.is_polite, rejected)) / len(pairs)
    assert polite_w == pytest.approx(0.5, abs=0.05) and polite_l == pytest.approx(0.5, abs=0.05)
    # trait two carries no preference signal: P(chosen polite) does not depend on the rejected one
    both = sum(world.is_polite(c) and world.is_polite(r) for c, r in zip(chosen, rejected, strict=True)) / len(pairs)
    assert both == pytest.approx(polite_w * polite_l, abs=0.05)


def test_evaluation_questions_are_held_out():
    train = set(world.train_questions())
    held_out = world.eval_questions()
    assert not train & set(held_out)
    assert not {q.topic for q in train} & set(world.HELD_OUT_TOPICS)
    assert {q.topic for q in held_out if q.held_out_topic} == set(world.HELD_OUT_TOPICS)
    assert {q.template for q in held_out if not q.held_out_topic} == set(world.HELD_OUT_TEMPLATES)


def test_answers_are_classified_by_both_traits():
    for concise in (True, False):
        for polite in (True, False):
            text = world.answer("the moon", concise, polite)
            assert (world.is_concise(text), world.is_polite(text)) == (concise, polite)


def test_batched_sequence_logps_equal_one_sequence_at_a_time():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=0)  # fmt: skip
    model = Qwen2ForCausalLM(config).eval()
    sequences = [([5, 6, 7], [8, 9]), ([3], [4, 5, 6, 7]), ([10, 11, 12, 13], [14])]
    batched = evaluate.sequence_logps(model, sequences, pad_id=0)
    for (prompt, response), value in zip(sequences, batched, strict=True):
        ids = torch.tensor([prompt + response])
        logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
        expected = sum(logps[len(prompt) - 1 + i, token].item() for i, token in enumerate(response))
        assert value.item() == pytest.approx(expected, abs=1e-5)


def _summary(dpo_points, arm_point):
    """summary[name][key] = (mean, sd, n) with one measure `m`, from (step, mean, sd) triples."""
    summary = {}
    for i, (step, mean, sd) in enumerate(dpo_points):
        summary[f"dpo{i}"] = {"param_change": (step, 0.0, 3), "polite_prob": (mean, sd, 3)}
    step, mean, sd = arm_point
    summary["arm"] = {"param_change": (step, 0.0, 3), "polite_prob": (mean, sd, 3)}
    return summary


def test_dpo_curve_is_interpolated_at_the_arms_step_size():
    summary = _summary([(1.0, 0.5, 0.0), (2.0, 0.7, 0.0), (4.0, 0.8, 0.0)], (1.5, 0.9, 0.0))
    mean, se = report.dpo_at(summary, ["dpo0", "dpo1", "dpo2"], "polite_prob", 1.5)
    assert mean == pytest.approx(0.6) and se == 0.0
    assert report.dpo_at(summary, ["dpo0", "dpo1", "dpo2"], "polite_prob", 3.0)[0] == pytest.approx(0.75)
    assert report.dpo_at(summary, ["dpo0", "dpo1", "dpo2"], "polite_prob", 5.0) is None


@pytest.mark.parametrize(
    ("arm_point", "dpo_sd", "verdict"),
    [
        ((1.5, 0.9, 0.01), 0.01, "better"),
        ((1.5, 0.3, 0.01), 0.01, "worse"),
        ((1.5, 0.9, 0.5), 0.5, "no difference"),  # 0.3 apart, standard error 0.35
        ((9.0, 0.9, 0.01), 0.01, "outside DPO's sweep"),
    ],
)
def test_matched_comparison_verdicts(arm_point, dpo_sd, verdict, monkeypatch):
    monkeypatch.setattr(report, "COMPARED", (("polite_prob", "P(polite)", True),))
    summary = _summary([(1.0, 0.5, dpo_sd), (2.0, 0.7, dpo_sd)], arm_point)
    arms = [SimpleNamespace(name=n, is_dpo=n.startswith("dpo")) for n in summary]
    (row,) = report.matched_comparison(summary, arms)
    assert row["verdict"] == verdict
    if "diff" in row:
        assert row["diff"] == pytest.approx(arm_point[1] - 0.6)
        expected_se = math.hypot(arm_point[2] / math.sqrt(3), math.hypot(0.5 * dpo_sd, 0.5 * dpo_sd) / math.sqrt(3))
        assert row["se"] == pytest.approx(expected_se)


def test_a_measure_without_a_better_direction_is_called_higher_or_lower(monkeypatch):
    monkeypatch.setattr(report, "COMPARED", (("polite_prob", "Δ logp(chosen)", None),))
    summary = _summary([(1.0, 0.5, 0.01), (2.0, 0.7, 0.01)], (1.5, 0.3, 0.01))
    arms = [SimpleNamespace(name=n, is_dpo=n.startswith("dpo")) for n in summary]
    (row,) = report.matched_comparison(summary, arms)
    assert row["verdict"] == "lower"
