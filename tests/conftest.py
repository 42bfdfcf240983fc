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


# The default OUTPUT_DIR, LOG_DIR and CACHE_DIR are relative (model_output/, logs/, .cache/), and a checkout where
# `./fast_train.sh` ran holds a finished run there: no test may read or write them. Every test runs in a fresh
# temporary folder of its own, and the fixtures shared by several tests in one of the session's.


@pytest.fixture(scope="session", autouse=True)
def _session_in_a_temporary_folder(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("session_cwd"))
        yield


# The defaults that are not relative: the embedded model and the cache live in the repository.
DEFAULT_PATHS = [REPO / name for name in ("model_output", "logs", "tiny_model", ".cache/preference_dpo")]


def _folder_times(root: Path) -> dict[str, int]:
    """Every folder's modification time under `root`: a file added or removed anywhere changes one."""
    times, todo = {}, [root] if root.is_dir() else []
    while todo:
        folder = todo.pop()
        times[str(folder)] = folder.stat().st_mtime_ns
        todo += [Path(entry.path) for entry in os.scandir(folder) if entry.is_dir(follow_symlinks=False)]
    return times


@pytest.fixture(autouse=True)
def _test_in_a_temporary_folder(tmp_path_factory, monkeypatch):
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    before = {path: _folder_times(path) for path in DEFAULT_PATHS}
    yield
    changed = [str(path.relative_to(REPO)) for path in DEFAULT_PATHS if _folder_times(path) != before[path]]
    if changed:  # pass --output_dir, --log_dir, --cache_dir (or their variables) under tmp_path
        pytest.fail(f"the test wrote to the repository's default folder(s) {changed}")


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
