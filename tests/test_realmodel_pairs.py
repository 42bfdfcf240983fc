"""The real-model building blocks without the model: the pairs' construction, the detectors, DEMO=smollm2."""

from __future__ import annotations

import json
import os
import shlex
import subprocess

import pytest

from bench.realmodel.detectors import is_french, share, transfer_ratio
from bench.realmodel.pairs import TOPICS, first_sentence, questions

from .conftest import REPO

PAIRS = REPO / "data" / "smollm2_pairs"


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Sleep is essential for health. It helps the body recover.", "Sleep is essential for health."),
        ("Dr. Smith says so. Then more.", None),  # a head under 15 characters is no sentence to prefer
        ("Running is fun and good for you! Start slowly.", "Running is fun and good for you!"),
        ("Only one sentence here, nothing after it.", None),  # no contrast
        ("Here are some tips:\n1. Rest. 2. Eat.", None),  # a list, not a first sentence
    ],
)
def test_first_sentence(answer, expected):
    assert first_sentence(answer) == expected


def test_french_detector_and_transfer_ratio():
    assert is_french("La capitale de l'Allemagne est Berlin.")
    assert is_french("Le sommeil est très important pour la santé et le bien-être.")
    assert not is_french("The capital of Germany is Berlin.")
    assert not is_french("I like le croissant and the coffee with my friends.")
    assert not is_french("")
    assert share(is_french, ["Le chat est noir.", "The cat is black.", "Il est là."]) == pytest.approx(2 / 3)
    assert transfer_ratio(before=0.0, after=0.3, instructed=0.6) == pytest.approx(0.5)
    assert transfer_ratio(before=0.2, after=0.2, instructed=0.2) != transfer_ratio(0.2, 0.2, 0.2)  # nan: no effect


def test_committed_pairs_are_the_brevity_contrast_on_held_out_subjects():
    rows = {split: [json.loads(line) for line in open(PAIRS / f"{split}.jsonl", encoding="utf-8")]
            for split in ("train", "test")}  # fmt: skip
    assert (len(rows["train"]), len(rows["test"])) == (88, 38)
    assert not set(TOPICS["train"]) & set(TOPICS["test"])
    for split, split_rows in rows.items():
        asked = set(questions(split))
        for row in split_rows:
            chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
            assert row["prompt"][0]["content"] in asked
            assert first_sentence(rejected) == chosen and len(rejected) > len(chosen)


def _dry_run(**env) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(REPO / "fast_train.sh")],
        env={**os.environ, "DRY_RUN": "1", "DEVICE": "cpu", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_demo_smollm2_sets_defaults_and_the_environment_still_wins():
    args = shlex.split(_dry_run(DEMO="smollm2", LEARNING_RATE="1e-4").stdout)
    flags = dict(zip(args[2::2], args[3::2], strict=False))
    assert flags["--model_name_or_path"] == "smollm2"
    assert flags["--train_dataset_path"] == str(PAIRS / "train.jsonl")
    assert flags["--preference_text"] == "Answer in French."
    # the default form with its own top-16, sequence_sum and ALPHA 1 (tests/test_config.py): none of them passed
    assert flags["--align_loss"] == "ref_distill"
    assert not {"--distill_top_k", "--distill_reduction", "--aligned_loss_weight"} & set(flags)
    assert flags["--learning_rate"] == "1e-4"  # set in the environment: kept
    overridden = shlex.split(_dry_run(DEMO="smollm2", ALPHA="0.5", POLICY_MODEL_PATH="/m").stdout)
    assert "0.5" in overridden and "/m" in overridden
    bad = _dry_run(DEMO="qwen")
    assert bad.returncode == 2 and bad.stderr.strip() == "fast_train.sh: error: DEMO='qwen' must be empty or smollm2."
