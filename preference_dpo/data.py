"""Preference-pair files -> a `datasets.Dataset` with TRL's `prompt`, `chosen`, `rejected` columns.

Accepted files: `.jsonl`, `.json` (an array of objects, or JSON Lines), `.parquet`, and folders written
by `datasets.save_to_disk` (or holding such files). Accepted row shapes (docs/method.md, "Data"):

- standard: `prompt`, `chosen`, `rejected` strings;
- conversational: `prompt` a list of `{role, content}` messages, `chosen`/`rejected` the assistant turn(s);
- conversational with whole conversations in `chosen`/`rejected` (UltraFeedback-binarized: `prompt` is
  the question as a string, or missing): the shared leading messages are the prompt;
- implicit prompt: only `chosen`/`rejected` strings holding the whole transcript (HH-RLHF): their
  longest common prefix, cut back to a whitespace boundary, is the prompt.

Every problem names the file and the line (or row) and what to fix. Extra columns are ignored.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import UserInputError

logger = logging.getLogger(__name__)

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
Message = dict[str, str]


def _rows_from_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield f"line {number}", json.loads(line)
            except json.JSONDecodeError as e:
                raise UserInputError(
                    f"{path} line {number}: not valid JSON ({e.msg}); fix or remove the line."
                ) from None


def _rows_from_json(path: Path) -> Iterator[tuple[str, Any]]:
    text = path.read_text(encoding="utf-8")
    try:
        content = json.loads(text)
    except json.JSONDecodeError:
        yield from _rows_from_jsonl(path)  # JSON Lines saved with a .json suffix, as `datasets` writes them
        return
    if isinstance(content, dict) and len(content) == 1 and isinstance(next(iter(content.values())), list):
        content = next(iter(content.values()))  # {"data": [...]}-style wrapper
    if not isinstance(content, list):
        raise UserInputError(f"{path}: a .json file must hold an array of objects (or one object per line).")
    for number, row in enumerate(content, start=1):
        yield f"row {number}", row


def _rows_from_table(path: Path, table) -> Iterator[tuple[str, Any]]:
    for number, row in enumerate(table.to_pylist(), start=1):
        yield f"row {number}", row


def _rows_from_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a corrupt or non-parquet file
        raise UserInputError(f"{path}: not a readable Parquet file ({e}).") from None
    yield from _rows_from_table(path, table)


def _rows_from_saved_dataset(path: Path) -> Iterator[tuple[str, Any]]:
    from datasets import DatasetDict, load_from_disk

    dataset = load_from_disk(str(path))
    if isinstance(dataset, DatasetDict):
        if "train" not in dataset and len(dataset) != 1:
            raise UserInputError(
                f"{path}: a saved DatasetDict with splits {sorted(dataset)}; point to one split's folder instead."
            )
        dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
    yield from _rows_from_table(path, dataset.data)


def _data_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix not in DATA_SUFFIXES:
            raise UserInputError(
                f"{path}: unsupported file type {path.suffix or '(none)'!r}; use .jsonl, .json or .parquet."
            )
        return [path]
    files = sorted(p for p in path.iterdir() if p.suffix in DATA_SUFFIXES and p.is_file())
    if not files:
        raise UserInputError(
            f"{path}: folder holds no .jsonl, .json or .parquet file and is not a `datasets.save_to_disk` folder."
        )
    return files


def iter_raw_rows(path: str | os.PathLike) -> Iterator[tuple[str, str, Any]]:
    """Yield (file, location, row) for every row under `path`, in file order."""
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"{path}: no such file or folder.")
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        for location, row in _rows_from_saved_dataset(path):
            yield str(path), location, row
        return
    readers = {".jsonl": _rows_from_jsonl, ".json": _rows_from_json, ".parquet": _rows_from_parquet}
    for file in _data_files(path):
        for location, row in readers[file.suffix](file):
            yield str(file), location, row


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    )


def _check_field(where: str, name: str, value: Any) -> None:
    if value is None:
        raise UserInputError(f"{where}: missing field {name!r}; every pair needs 'chosen' and 'rejected'.")
    if isinstance(value, str):
        if not value.strip():
            raise UserInputError(f"{where}: field {name!r} is empty; remove the pair or fill it in.")
        return
    if not _is_messages(value):
        raise UserInputError(
            f"{where}: field {name!r} must be a string or a list of {{role, content}} messages, "
            f"got {type(value).__name__}."
        )
    if not value or not any(m["content"].strip() for m in value):
        raise UserInputError(f"{where}: field {name!r} has no message content; remove the pair or fill it in.")


def _common_prefix_messages(a: list[Message], b: list[Message]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _split_text_prefix(chosen: str, rejected: str) -> int:
    """Length of the shared prompt of two transcripts: the common prefix cut back to whitespace."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    # Keep whole words in the completion: back up to just after the last whitespace, and leave a space
    # that starts the response with the response (HH-RLHF: "Assistant:" | " I think ...").
    while n > 0 and not chosen[n - 1].isspace():
        n -= 1
    while n > 0 and chosen[n - 1] in " \t":
        n -= 1
    return n


def normalize_row(row: Any, where: str) -> dict[str, Any]:
    """One raw row -> {prompt, chosen, rejected} in TRL's standard or conversational form."""
    if not isinstance(row, dict):
        raise UserInputError(f"{where}: each row must be a JSON object, got {type(row).__name__}.")
    chosen, rejected, prompt = row.get("chosen"), row.get("rejected"), row.get("prompt")
    _check_field(where, "chosen", chosen)
    _check_field(where, "rejected", rejected)
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise UserInputError(f"{where}: 'chosen' and 'rejected' must both be strings or both message lists.")

    if isinstance(chosen, list):
        if chosen[0]["role"] != "assistant" or rejected[0]["role"] != "assistant":
            # Whole conversations: the shared leading turns are the prompt; a `prompt` column, if any, repeats it.
            n = _common_prefix_messages(chosen, rejected)
            if n == 0 or n == min(len(chosen), len(rejected)):
                raise UserInputError(
                    f"{where}: 'chosen' and 'rejected' hold conversations that share no prompt turns or no reply; "
                    "they must start with the same messages and end with different assistant turns."
                )
            if isinstance(prompt, list) and prompt and prompt != chosen[:n]:
                raise UserInputError(f"{where}: 'prompt' differs from the turns 'chosen' and 'rejected' start with.")
            return {"prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}
        if isinstance(prompt, str) and prompt.strip():
            prompt = [{"role": "user", "content": prompt}]
        if prompt is None or not _is_messages(prompt) or not prompt:
            raise UserInputError(
                f"{where}: 'chosen'/'rejected' hold only assistant turns, so 'prompt' must be a non-empty list of "
                "{role, content} messages (or the question as a string)."
            )
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}

    if prompt is None:
        n = _split_text_prefix(chosen, rejected)
        if n == 0:
            raise UserInputError(
                f"{where}: no 'prompt' field and 'chosen'/'rejected' share no prefix to take as the prompt; "
                "add a 'prompt' field."
            )
        return {"prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}
    if not isinstance(prompt, str):
        raise UserInputError(f"{where}: 'prompt' must be a string when 'chosen'/'rejected' are strings.")
    if not prompt.strip():
        raise UserInputError(f"{where}: field 'prompt' is empty; remove the pair or fill it in.")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def load_preference_dataset(path: str | os.PathLike):
    """Load, check and normalize every pair under `path` into a `datasets.Dataset`."""
    from datasets import Dataset

    rows: list[dict[str, Any]] = []
    conversational = None
    for file, location, raw in iter_raw_rows(path):
        where = f"{file} {location}"
        row = normalize_row(raw, where)
        is_conv = isinstance(row["prompt"], list)
        if conversational is None:
            conversational = is_conv
        elif conversational != is_conv:
            raise UserInputError(
                f"{where}: mixes conversational (message-list) and plain-text pairs; use one shape per data set."
            )
        rows.append(row)
    if not rows:
        raise UserInputError(f"{path}: holds no preference pairs.")
    logger.info("Loaded %d %s pairs from %s", len(rows), "conversational" if conversational else "plain-text", path)
    return Dataset.from_list(rows)
