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


def test_interpolation_between_sweep_points_and_none_outside():
    points = [(2.0, 0.7), (1.0, 0.5), (4.0, 0.8)]
    assert report.interpolate(points, 1.5) == pytest.approx(0.6)
    assert report.interpolate(points, 3.0) == pytest.approx(0.75)
    assert report.interpolate(points, 1.0) == pytest.approx(0.5)
    assert report.interpolate(points, 0.5) is None and report.interpolate(points, 5.0) is None


def _runs(arm_values: list[float], arm_steps: list[float]) -> list[dict]:
    """Per seed: a DPO sweep at steps 1 and 2 (values 0.5 + 0.1 * seed and 0.7 + 0.1 * seed) and one arm run."""
    runs = []
    for seed, (value, step) in enumerate(zip(arm_values, arm_steps, strict=True)):
        runs.append({"arm": "dpo a", "seed": seed, "param_change": 1.0, "polite_prob": 0.5 + 0.1 * seed})
        runs.append({"arm": "dpo b", "seed": seed, "param_change": 2.0, "polite_prob": 0.7 + 0.1 * seed})
        runs.append({"arm": "form", "seed": seed, "param_change": step, "polite_prob": value})
    return runs


ARMS = [SimpleNamespace(name="dpo a", is_dpo=True), SimpleNamespace(name="dpo b", is_dpo=True),
        SimpleNamespace(name="form", is_dpo=False)]  # fmt: skip


@pytest.mark.parametrize(
    ("arm_values", "arm_steps", "verdict"),
    [
        # DPO at step 1.5 is 0.6 + 0.1 * seed: the arm is 0.2 above it on every seed, although the seeds'
        # own levels differ by more than that (pairing removes the base models' spread)
        ([0.8, 0.9, 1.0], [1.5, 1.5, 1.5], "better"),
        ([0.4, 0.5, 0.6], [1.5, 1.5, 1.5], "worse"),
        ([0.9, 0.6, 0.7], [1.5, 1.5, 1.5], "no difference"),  # differences +0.3, -0.1, -0.1
        ([0.9, 0.9, 0.9], [3.0, 3.0, 1.5], "outside DPO's sweep"),  # only one seed inside the sweep
    ],
)
def test_matched_comparison_is_paired_by_seed(arm_values, arm_steps, verdict, monkeypatch):
    monkeypatch.setattr(report, "COMPARED", (("polite_prob", "P(polite)", True),))
    (row,) = report.matched_comparison(_runs(arm_values, arm_steps), ARMS, baselines={})
    assert row["verdict"] == verdict
    if "diff" in row:
        diffs = [v - (0.6 + 0.1 * seed) for seed, v in enumerate(arm_values)]
        assert row["diff"] == pytest.approx(sum(diffs) / 3)
        sd = (sum((d - row["diff"]) ** 2 for d in diffs) / 2) ** 0.5
        assert row["half_width"] == pytest.approx(4.303 * sd / math.sqrt(3))
    else:
        assert row["seeds"] == 1


def test_a_measure_without_a_better_direction_is_called_higher_or_lower(monkeypatch):
    monkeypatch.setattr(report, "COMPARED", (("polite_prob", "Δ logp(chosen)", None),))
    (row,) = report.matched_comparison(_runs([0.4, 0.5, 0.6], [1.5, 1.5, 1.5]), ARMS, baselines={})
    assert row["verdict"] == "lower"


def test_logp_change_is_measured_from_the_runs_own_base_model():
    baselines = {0: {"logp_chosen": -2.0}, 1: {"logp_chosen": -5.0}}
    assert report._value({"seed": 1, "logp_chosen": -4.0}, "dlogp_chosen", baselines) == pytest.approx(1.0)
    assert report._value({"seed": 0, "logp_chosen": -4.0}, "dlogp_chosen", baselines) == pytest.approx(-2.0)


def test_quick_mode_trains_and_measures_one_replicate_end_to_end(tmp_path, monkeypatch):
    """`python -m bench.method.run --quick` (the CI smoke test): pretrains one base model, trains plain DPO and
    the candidate transfer form through the tool's entry point, and measures both; the committed results stay."""
    import json

    from bench.method import run

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    committed = run.RESULTS_JSON.read_bytes()
    assert run.main(["--quick", "--work", str(tmp_path)]) == 0
    assert run.RESULTS_JSON.read_bytes() == committed  # a partial run never replaces the committed results
    results = json.loads((tmp_path / "results_partial.json").read_text())
    (base,) = results["baselines"]
    # the pretrained world: the instruction makes the polite ending likely, its absence leaves it a coin
    assert base["polite_prob_guided"] > 0.9 and 0.2 < base["polite_prob"] < 0.8
    runs = {r["arm"]: r for r in results["runs"]}
    assert set(runs) == set(run.QUICK_ARMS)
    for row in runs.values():
        assert row["param_change"] > 0 and row["margin"] > base["margin"] + 1  # trait one was learned
    transfer = runs[run.CANDIDATE]
    assert transfer["polite_prob"] > runs["dpo lr x1"]["polite_prob"]  # the guidance moved trait two beyond DPO
