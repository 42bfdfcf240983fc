"""Shared fixtures: a tiny model built once per session, small data files, offline mode."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
EMBEDDED_TRAIN = REPO / "data" / "preference_pairs" / "train.jsonl"
EMBEDDED_TEST = REPO / "data" / "preference_pairs" / "test.jsonl"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from preference_dpo.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def head_rows(path: Path, n: int) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(next(f)) for _ in range(n)]


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> tuple[Path, Path]:
    """48 train and 16 test pairs of the embedded data set (UltraFeedback-binarized shape)."""
    folder = tmp_path_factory.mktemp("data")
    train = write_jsonl(folder / "train.jsonl", head_rows(EMBEDDED_TRAIN, 48))
    test = write_jsonl(folder / "test.jsonl", head_rows(EMBEDDED_TEST, 16))
    return train, test
