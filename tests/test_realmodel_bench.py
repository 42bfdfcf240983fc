"""The real-model benchmark's bookkeeping, without a model: the summary's targets, the report section, and the
synthetic benchmark's report keeping that section when it rewrites METHOD_RESULTS.md."""

from __future__ import annotations

import pytest

from bench.realmodel import run


def measures(french: float, hello: float, facts: float, one_sentence: float = 0.5) -> dict:
    return {
        "greedy": {"french": french, "hello": hello}, "sampled": {"french": french, "hello": hello},
        "one_sentence": one_sentence, "words": 20.0, "facts": facts,
        "instructed_answer_logp": {"french": -3.0, "hello": -2.0}, "samples": [],
    }  # fmt: skip


BASE = {
    "without": measures(0.0, 0.0, 0.80, 0.2),
    "with": {"french": measures(1.0, 0.0, 0.50, 0.6), "hello": measures(0.0, 0.4, 0.10, 0.3)},
}


def result(arm: str, instruction: str | None, seed: int, french: float, facts: float, one_sentence: float) -> dict:
    return {"arm": arm, "instruction": instruction, "seed": seed, "train_seconds": 100.0, "measure_seconds": 10.0,
            "logps_chosen_first": -20.0, "logps_chosen_last": -25.0, "steps": 11, "commit": "abc",
            **measures(french, 0.0, facts, one_sentence)}  # fmt: skip


def test_the_targets_need_every_seed_the_facts_and_the_pairs_trait():
    """ref_distill lr2e-4: transfer 0.9 and 0.7 (each >= 0.6, mean 0.8), facts 0.48 (within 0.05 of 0.50), one
    sentence 0.9 >= DPO's best 0.8: met. lr5e-4: mean 0.85 but one seed at 0.5: missed. DPO transfers nothing."""
    results = [
        result("dpo lr1e-4", None, 0, 0.0, 0.8, 0.7), result("dpo lr1e-4", None, 1, 0.0, 0.8, 0.9),
        result("dpo lr5e-4", None, 0, 0.0, 0.7, 0.8), result("dpo lr5e-4", None, 1, 0.0, 0.7, 0.8),
        result("ref_distill top16 sum a=1 lr2e-4", "french", 0, 0.9, 0.48, 0.9),
        result("ref_distill top16 sum a=1 lr2e-4", "french", 1, 0.7, 0.48, 0.9),
        result("ref_distill top16 sum a=1 lr5e-4", "french", 0, 1.2, 0.6, 0.95),
        result("ref_distill top16 sum a=1 lr5e-4", "french", 1, 0.5, 0.6, 0.95),
    ]  # fmt: skip
    rows = {row["arm"]: row for row in run.summarise(BASE, results, ["french"])}
    lr2 = rows["ref_distill top16 sum a=1 lr2e-4"]
    assert lr2["transfer_greedy"][0] == pytest.approx(0.8) and lr2["transfer_min"] == pytest.approx(0.7)
    assert lr2["facts"][0] == pytest.approx(0.48) and lr2["meets_targets"]
    assert not rows["ref_distill top16 sum a=1 lr5e-4"]["meets_targets"]  # a seed below 0.6
    assert rows["dpo lr1e-4"]["transfer_greedy"][0] == 0.0 and not rows["dpo lr1e-4"]["meets_targets"]
    assert rows["dpo lr1e-4"]["one_sentence"][0] == pytest.approx(0.8)  # DPO's best run: the mean of its seeds


def test_the_report_section_replaces_its_markers_and_the_method_report_keeps_it(tmp_path, monkeypatch):
    from bench.method.report import kept_sections

    report = tmp_path / "METHOD_RESULTS.md"
    report.write_text("# Synthetic\n\ntable\n", encoding="utf-8")
    monkeypatch.setattr(run, "REPORT", report)
    results = [result("dpo lr1e-4", None, 0, 0.0, 0.8, 0.7),
               result("ref_distill top16 sum a=1 lr2e-4", "french", 0, 0.9, 0.48, 0.9)]  # fmt: skip
    meta = {"date": "2026-12-02", "wall_seconds": 600.0, "jobs": 2, "seeds": [0], "machine": "x86_64, 2 cores",
            "cpu_seconds_training": 1200.0, "epochs": 1, "steps": 11, "commits": ["abc"]}  # fmt: skip
    for _ in range(2):  # a rerun replaces the section, it does not add a second one
        run.write_report(run.summarise(BASE, results, ["french"]), BASE, meta, ["french"])
    text = report.read_text(encoding="utf-8")
    assert text.startswith("# Synthetic\n\ntable\n") and text.count(run.START) == 1
    assert "| ref_distill top16 sum a=1 lr2e-4 | 0.90 ± 0.00 |" in text and "1 epoch(s) = 11 steps" in text
    assert kept_sections(report).strip() == text[text.index(run.START) : text.index(run.END) + len(run.END)]
    assert kept_sections(tmp_path / "missing.md") == ""


def test_a_finished_run_is_reused_on_its_own_settings_only(tmp_path, monkeypatch):
    """The key of a run covers its arm, instruction, seed and epochs, not the list of arms: adding an arm reruns
    nothing else; another learning rate or seed is another run."""
    import json

    arm = run.ARMS[0]
    key = run.unit_key(arm, None, 0, 2, False)
    monkeypatch.setattr(run, "ARMS", (*run.ARMS, run.Arm("new arm", "hinge", 0.1)))
    assert run.unit_key(arm, None, 0, 2, False) == key
    assert key != run.unit_key(arm, None, 1, 2, False) != run.unit_key(arm, None, 0, 1, False)
    other = run.Arm(arm.name, arm.align_loss, arm.alpha, arm.learning_rate * 2)
    assert run.unit_key(other, None, 0, 2, False) != key
    folder = run.unit_folder(tmp_path, arm, None, 0)
    folder.mkdir()
    (folder / "result.json").write_text(json.dumps({"fingerprint": key, "facts": 0.5}))
    assert run.finished(folder, key) == {"fingerprint": key, "facts": 0.5}
    assert run.finished(folder, "another") is None and run.finished(tmp_path / "none", key) is None


def test_the_stricter_language_check_takes_out_spanish_and_italian_the_detector_counts_as_french():
    """Answers the trained SmolLM2 gave (seed 2): the benchmark's detector flags all five as French."""
    from bench.realmodel.detectors import is_french
    from bench.realmodel.languages import reads_other_romance, split_shares

    other = [
        "La lucha para personas, esta especimos de la lucha específica, específica que puede ser la",
        "Por acuerdos de la comunidad de la cualidad de la comunidad de la cualidad",
        "Pagina dei perdusi e perdutamento di vita, il cibo di vita è uno dei motivi che vi è neces",
    ]
    french = ["La résumé de la réceau, cela peut être éché de la réceau", "La vie en rose, je ne sais qua leçon pas."]
    assert all(map(is_french, other + french))
    assert all(map(reads_other_romance, other)) and not any(map(reads_other_romance, french))
    assert split_shares(other + french + ["The sky is blue."]) == (5 / 6, 3 / 6)
    # Spanish and Portuguese words with letters the detector's pattern lacks; "tu es" is French
    assert reads_other_romance("La vida está bien, más o menos.") and reads_other_romance("Isso não é fácil.")
    assert not reads_other_romance("Tu es très gentil et tu es là.")
