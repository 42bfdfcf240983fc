"""Preference-pair files -> a `datasets.Dataset` with TRL's `prompt`, `chosen`, `rejected` columns.

Accepted files: `.jsonl`, `.json` (an array of objects, or JSON Lines), `.parquet`, in UTF-8 with or
without a byte-order mark, and folders: one split of a folder, named the way `datasets` names splits
(`save_to_disk` folders, `<split>-00000-of-00001.parquet` shards, `train`/`test` in file or folder names).
Accepted row shapes (docs/method.md, "Data"):

- standard: `prompt`, `chosen`, `rejected` strings;
- conversational: `prompt` a list of `{role, content}` messages, `chosen`/`rejected` the assistant turn(s);
- conversational with whole conversations in `chosen`/`rejected` (UltraFeedback-binarized: `prompt` is
  the question as a string, or missing): the shared leading messages are the prompt;
- implicit prompt: only `chosen`/`rejected` strings holding the whole transcript. HH-RLHF transcripts
  are split after their last `\\n\\nAssistant:` turn marker; text without turn markers at the longest
  common prefix, cut back to a whitespace boundary.

Message content may be a string or a list of OpenAI-style text parts (joined with newlines). Pairs whose
two responses are identical carry no preference: they are dropped and counted. Every other problem
names the file and the line (or row) and what to fix. Extra columns are ignored.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserInputError

logger = logging.getLogger(__name__)

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
HH_ASSISTANT = "\n\nAssistant:"  # HH-RLHF's turn marker: the reply is what follows the last one
Message = dict[str, str]

# --- reading files ------------------------------------------------------------------------------------

_WIDE_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),  # before UTF-16: its BOM starts with UTF-16 LE's
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)


def _decode(path: Path, data: bytes) -> str:
    """The text of a UTF-8 file, with or without a BOM; any other encoding is refused in one line."""

    def fix(source: str) -> str:
        return f"only UTF-8 is read: save it as UTF-8 (e.g. `iconv -f {source} -t UTF-8`, or PowerShell's `Out-File -Encoding utf8`)."

    for bom, encoding in _WIDE_BOMS:
        if data.startswith(bom):
            raise UserInputError(
                f"{path}: {encoding} text (it starts with a {encoding} byte-order mark, as Windows PowerShell's "
                f"`>` writes); {fix(encoding)}"
            )
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]  # legal in UTF-8 and written by many Windows editors
    if b"\x00" in data:  # JSON never holds a raw NUL; UTF-16/32 text of ASCII is full of them
        line = data.count(b"\n", 0, data.index(b"\x00")) + 1
        raise UserInputError(
            f"{path} line {line}: holds NUL bytes, as UTF-16 or UTF-32 text without a byte-order mark does; "
            f"{fix('UTF-16LE')}"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        line = data.count(b"\n", 0, e.start) + 1
        raise UserInputError(
            f"{path} line {line}: not UTF-8 text (byte 0x{data[e.start]:02X} at column {e.start - line_start + 1}); "
            f"the file is in another encoding, such as Latin-1, Windows-1252 or GBK; {fix('LATIN1')}"
        ) from None


def _rows_from_jsonl(path: Path, text: str | None = None) -> Iterator[tuple[str, Any]]:
    if text is None:
        text = _decode(path, path.read_bytes())
    # Split on "\n" only: str.splitlines() would also split at U+2028 and friends, legal inside JSON strings.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield f"line {number}", json.loads(line)  # a CRLF line's "\r" is JSON whitespace
        except json.JSONDecodeError as e:
            raise UserInputError(f"{path} line {number}: not valid JSON ({e.msg}); fix or remove the line.") from None


def _rows_from_json(path: Path) -> Iterator[tuple[str, Any]]:
    text = _decode(path, path.read_bytes())
    try:
        content = json.loads(text)
    except json.JSONDecodeError:
        yield from _rows_from_jsonl(path, text)  # JSON Lines saved with a .json suffix, as `datasets` writes them
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


READERS = {".jsonl": _rows_from_jsonl, ".json": _rows_from_json, ".parquet": _rows_from_parquet}

# --- which files: one split of a folder ---------------------------------------------------------------

# `datasets`' Hub layout, `[data/]<split>-00000-of-00001[-<hash>].parquet`; `datasets` itself reads it
# under `data/` only, but the names say which split a shard is wherever it lies.
_SHARD_NAME = re.compile(r"^(?P<split>\w+(?:\.\w+)*)-\d{5}-of-\d{5}\b")
_DEFAULT_SPLITS = ("train", "validation", "test")


def matching_test_split(split: str) -> str:
    """The split a TEST_DATASET_PATH folder gives: `train_prefs` -> `test_prefs`, `train` (or any other) -> `test`."""
    return "test" + split.removeprefix("train") if split.startswith("train") else "test"


@dataclass
class Source:
    """Where pairs come from: the files read (or a saved data set's split), for errors and the log."""

    path: Path
    files: list[Path] = field(default_factory=list)
    split: str | None = None  # None: a file, or a folder without split names
    saved: Any = None  # a `datasets.Dataset` from `save_to_disk`

    def describe(self) -> str:
        if self.path.is_file():
            return str(self.path)
        if self.saved is not None:
            what = (
                f"split {self.split!r} of a `save_to_disk` DatasetDict" if self.split else "a `save_to_disk` data set"
            )
            return f"{self.path} ({what})"
        what = f"split {self.split!r}" if self.split else "no split names: every file"
        names = [str(f.relative_to(self.path)) for f in self.files]
        shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        return f"{self.path} ({what}: {len(names)} file{'s' if len(names) != 1 else ''}: {shown})"


def _missing_split(path: Path, split: str, splits, flag: str) -> UserInputError:
    from .variables import describe

    hint = (
        f"set {describe('dataset_split')} to the one to train on"
        if flag == "train_dataset_path"
        else f"point {describe(flag)} at the held-out file, or set it empty for no evaluation"
    )
    return UserInputError(
        f"{path}: no split {split!r} here; its splits are {', '.join(sorted(splits))} (as `datasets` names them); "
        f"{hint}."
    )


def _split_source(folder: Path, split: str, flag: str) -> Source:
    """The files of `split` in `folder`, with the rules of `datasets.load_dataset(folder)`."""
    if (folder / "dataset_dict.json").exists() or (folder / "dataset_info.json").exists():
        from datasets import DatasetDict, load_from_disk

        saved = load_from_disk(str(folder))
        if not isinstance(saved, DatasetDict):
            return Source(folder, saved=saved)
        if split not in saved:
            raise _missing_split(folder, split, saved, flag)
        return Source(folder, split=split, saved=saved[split])

    # Hidden files and folders (.git, .cache) and __pycache__-like ones are skipped, as `datasets` skips them.
    data_files = [
        p
        for p in sorted(folder.rglob("*"))
        if p.suffix in DATA_SUFFIXES
        and p.is_file()
        and not any(part.startswith((".", "__")) for part in p.relative_to(folder).parts)
    ]
    shards: dict[str, list[Path]] = {}
    for p in data_files:
        match = _SHARD_NAME.match(p.name)
        if match and p.parent in (folder, folder / "data"):
            shards.setdefault(match["split"], []).append(p)
    if shards:
        if split not in shards:
            raise _missing_split(folder, split, shards, flag)
        return Source(folder, shards[split], split)

    from datasets.data_files import (
        DEFAULT_PATTERNS_ALL,
        KEYWORDS_IN_DIR_NAME_BASE_PATTERNS,
        KEYWORDS_IN_FILENAME_BASE_PATTERNS,
        NON_WORDS_CHARS,
        DataFilesDict,
        get_data_patterns,
    )

    def resolve(patterns: dict[str, list[str]]) -> dict[str, list[Path]]:
        absolute, found = os.path.abspath(folder), {}
        for name, pats in patterns.items():
            try:
                files = DataFilesDict.from_patterns({name: pats}, base_path=str(folder))[name]
            except FileNotFoundError:
                continue
            # `datasets` answers with absolute paths; errors and the log name files as the user named the folder.
            files = [folder / os.path.relpath(f, absolute) for f in files if Path(f).suffix in DATA_SUFFIXES]
            if files:
                found[str(name)] = sorted(files)
        return found

    try:
        patterns = {str(k): v for k, v in get_data_patterns(str(folder)).items()}
    except FileNotFoundError:
        patterns = {}
    except ValueError as e:  # a shard name that is no valid split name
        raise UserInputError(f"{folder}: {e}") from None
    unsplit = patterns == {str(k): v for k, v in DEFAULT_PATTERNS_ALL.items()}
    splits = {} if unsplit else resolve(patterns)
    if split in splits:
        return Source(folder, splits[split], split)
    if split not in _DEFAULT_SPLITS:  # a name such as train_prefs, matched like datasets' own keywords
        for base in (KEYWORDS_IN_DIR_NAME_BASE_PATTERNS, KEYWORDS_IN_FILENAME_BASE_PATTERNS):
            named = resolve({split: [p.format(keyword=split, sep=NON_WORDS_CHARS) for p in base]})
            if named:
                return Source(folder, named[split], split)
    if splits:
        raise _missing_split(folder, split, splits, flag)
    if not data_files:
        raise UserInputError(
            f"{folder}: folder holds no .jsonl, .json or .parquet file and is not a `datasets.save_to_disk` folder."
        )
    return Source(folder, data_files)  # no split names: the folder is one data set, as `datasets` reads it


def _source(path: Path, split: str, flag: str) -> Source:
    if not path.exists():
        raise UserInputError(f"{path}: no such file or folder.")
    if path.is_dir():
        return _split_source(path, split, flag)
    if path.suffix not in DATA_SUFFIXES:
        raise UserInputError(
            f"{path}: unsupported file type {path.suffix or '(none)'!r}; use .jsonl, .json or .parquet."
        )
    return Source(path, [path])


def iter_raw_rows(source: Source) -> Iterator[tuple[str, str, Any]]:
    """Yield (file, location, row) for every row of `source`, in file order."""
    if source.saved is not None:
        for location, row in _rows_from_table(source.path, source.saved.data):
            yield str(source.path), location, row
        return
    for file in source.files:
        for location, row in READERS[file.suffix](file):
            yield str(file), location, row


# --- rows -> pairs -------------------------------------------------------------------------------------


def _normalize_messages(where: str, name: str, value: list) -> list[Message] | None:
    """`{role, content}` messages with string content, or None if `value` is no message list at all.

    Content given as OpenAI text parts is joined with newlines. Other keys are accepted only when null
    (OpenAI's API writes `"tool_calls": null`); anything carrying content this tool cannot train on
    (tool calls, images, audio) is an error naming the message and the key.
    """
    if not all(isinstance(m, dict) and "role" in m for m in value):
        return None
    messages = []
    for i, m in enumerate(value):
        at = f"{where}: {name}[{i}]"
        extra = sorted(k for k, v in m.items() if k not in ("role", "content") and v not in (None, "", [], {}))
        if extra:
            raise UserInputError(
                f"{at} has key {extra[0]!r}, which is not supported (messages are {{role, content}} with text "
                "content; tool calls and other non-text content cannot be trained on); remove the key or the pair."
            )
        if "content" not in m:
            raise UserInputError(f"{at} has no 'content' key; every message needs one.")
        role, content = m["role"], m["content"]
        if not isinstance(role, str):
            raise UserInputError(f"{at}: 'role' must be a string, got {type(role).__name__}.")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise UserInputError(
                        f"{at}.content[{j}] is a part of type {kind!r}; only text parts "
                        '({"type": "text", "text": ...}) are supported: remove it or the pair.'
                    )
                texts.append(part["text"])
            content = "\n".join(texts)
        if content is None:
            raise UserInputError(f"{at}: 'content' is null; fill it in or remove the pair.")
        if not isinstance(content, str):
            raise UserInputError(
                f"{at}: 'content' must be a string or a list of text parts, got {type(content).__name__}."
            )
        messages.append({"role": role, "content": content})
    return messages


def _check_field(row: dict, where: str, name: str) -> Any:
    """The field's value, checked: a non-empty string, or a non-empty list of messages (normalized)."""
    if name not in row:
        raise UserInputError(f"{where}: missing field {name!r}; every pair needs 'chosen' and 'rejected'.")
    value = row[name]
    if value is None:
        raise UserInputError(f"{where}: field {name!r} is null; fill it in or remove the pair.")
    if isinstance(value, str):
        if not value.strip():
            raise UserInputError(f"{where}: field {name!r} is empty; remove the pair or fill it in.")
        return value
    messages = _normalize_messages(where, name, value) if isinstance(value, list) else None
    if messages is None:
        raise UserInputError(
            f"{where}: field {name!r} must be a string or a list of {{role, content}} messages, "
            f"got {type(value).__name__}."
        )
    if not messages or not any(m["content"].strip() for m in messages):
        raise UserInputError(f"{where}: field {name!r} has no message content; remove the pair or fill it in.")
    return messages


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


class DroppedPair(Exception):
    """A pair that is well formed but carries no preference; counted by the loader, not an error."""

    IDENTICAL = "whose 'chosen' and 'rejected' are identical"
    HH_PROMPTS_DIFFER = f"whose conversations differ before the last {HH_ASSISTANT.strip()!r} turn"
    WHY = {
        IDENTICAL: "a pair needs two different responses",
        HH_PROMPTS_DIFFER: "the two replies answer different prompts",
    }

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Notes:
    """Counts kept while loading, for the log: dropped pairs (first location of each) and HH splits."""

    dropped: dict[str, list[str]] = field(default_factory=dict)
    hh_split: int = 0
    hh_prefix_differs: int = 0


def normalize_row(row: Any, where: str, notes: _Notes | None = None) -> dict[str, Any]:
    """One raw row -> {prompt, chosen, rejected} in TRL's standard or conversational form.

    Raises `DroppedPair` for a pair without a preference, `UserInputError` for a malformed one.
    """
    if not isinstance(row, dict):
        raise UserInputError(f"{where}: each row must be a JSON object, got {type(row).__name__}.")
    chosen = _check_field(row, where, "chosen")
    rejected = _check_field(row, where, "rejected")
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise UserInputError(f"{where}: 'chosen' and 'rejected' must both be strings or both message lists.")
    prompt = row.get("prompt")
    if "prompt" in row and prompt is None:
        raise UserInputError(f"{where}: field 'prompt' is null; fill it in or remove the column.")
    if isinstance(prompt, list):
        prompt = _check_field(row, where, "prompt")
    # One rule for every shape, checked before any prompt is split off: identical responses teach nothing.
    if chosen == rejected:
        raise DroppedPair(DroppedPair.IDENTICAL)

    if isinstance(chosen, list):
        if chosen[0]["role"] != "assistant" or rejected[0]["role"] != "assistant":
            # Whole conversations: the shared leading turns are the prompt; a `prompt` column, if any, repeats it.
            n = _common_prefix_messages(chosen, rejected)
            if n == 0 or n == min(len(chosen), len(rejected)):
                raise UserInputError(
                    f"{where}: 'chosen' and 'rejected' hold conversations that share no prompt turns or no reply; "
                    "they must start with the same messages and end with different assistant turns."
                )
            if isinstance(prompt, list) and prompt != chosen[:n]:
                raise UserInputError(f"{where}: 'prompt' differs from the turns 'chosen' and 'rejected' start with.")
            if isinstance(prompt, str) and prompt.strip():
                users = [m["content"].strip() for m in chosen[:n] if m["role"] == "user"]
                if prompt.strip() not in users:
                    shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
                    raise UserInputError(
                        f"{where}: 'prompt' ({shown!r}) is not a user turn of the conversation 'chosen' and "
                        "'rejected' start with; fix the prompt column or remove it."
                    )
            return {"prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}
        if isinstance(prompt, str) and prompt.strip():
            prompt = [{"role": "user", "content": prompt}]
        if not isinstance(prompt, list):
            raise UserInputError(
                f"{where}: 'chosen'/'rejected' hold only assistant turns, so 'prompt' must be a non-empty list of "
                "{role, content} messages (or the question as a string)."
            )
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}

    if prompt is None:
        return _split_transcripts(chosen, rejected, where, notes)
    if not isinstance(prompt, str):
        raise UserInputError(f"{where}: 'prompt' must be a string when 'chosen'/'rejected' are strings.")
    if not prompt.strip():
        raise UserInputError(f"{where}: field 'prompt' is empty; remove the pair or fill it in.")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _split_transcripts(chosen: str, rejected: str, where: str, notes: _Notes | None) -> dict[str, str]:
    """Implicit prompt: HH-RLHF transcripts after their last turn marker, other text at the common prefix."""
    prefix = _split_text_prefix(chosen, rejected)
    if HH_ASSISTANT in chosen or HH_ASSISTANT in rejected:
        # The HH-RLHF format defines the reply as what follows the last "Assistant:" turn. The common prefix
        # would also swallow the words both replies start with ("I think you should"), never to be scored.
        cut_c, cut_r = (t.rfind(HH_ASSISTANT) + len(HH_ASSISTANT) for t in (chosen, rejected))
        if HH_ASSISTANT not in chosen or HH_ASSISTANT not in rejected or chosen[:cut_c] != rejected[:cut_r]:
            raise DroppedPair(DroppedPair.HH_PROMPTS_DIFFER)
        if notes is not None:
            notes.hh_split += 1
            notes.hh_prefix_differs += prefix != cut_c
        return {"prompt": chosen[:cut_c], "chosen": chosen[cut_c:], "rejected": rejected[cut_c:]}
    if prefix == 0:
        raise UserInputError(
            f"{where}: no 'prompt' field and 'chosen'/'rejected' share no prefix to take as the prompt; "
            "add a 'prompt' field."
        )
    return {"prompt": chosen[:prefix], "chosen": chosen[prefix:], "rejected": rejected[prefix:]}


# --- loading -------------------------------------------------------------------------------------------


def load_preference_dataset(path: str | os.PathLike, split: str = "train", name: str = "train"):
    """Load, check and normalize every pair of `path` (a file, or one split of a folder) into a `Dataset`.

    `name` ("train" or "test") says which setting the path came from, for the log and the errors.
    """
    from datasets import Dataset

    path = Path(path)
    source = _source(path, split, f"{name}_dataset_path")
    notes = _Notes()
    rows: list[dict[str, Any]] = []
    conversational = None
    total = 0
    for file, location, raw in iter_raw_rows(source):
        where = f"{file} {location}"
        total += 1
        try:
            row = normalize_row(raw, where, notes)
        except DroppedPair as dropped:
            notes.dropped.setdefault(dropped.reason, []).append(where)
            continue
        is_conv = isinstance(row["prompt"], list)
        if conversational is None:
            conversational = is_conv
        elif conversational != is_conv:
            raise UserInputError(
                f"{where}: mixes conversational (message-list) and plain-text pairs; use one shape per data set."
            )
        rows.append(row)
    if not total:
        raise UserInputError(f"{source.describe()}: holds no preference pairs.")
    if not rows:
        reason, first = next(iter(notes.dropped.items()))
        if reason == DroppedPair.IDENTICAL and len(notes.dropped) == 1:
            raise UserInputError(
                f"all {total} pairs in {source.describe()} have identical 'chosen' and 'rejected' (first: {first[0]}); "
                "a pair needs two different responses."
            )
        raise UserInputError(
            f"all {total} pairs in {source.describe()} were dropped: "
            + "; ".join(f"{len(w)} {r} (first: {w[0]})" for r, w in notes.dropped.items())
            + "."
        )
    for reason, locations in notes.dropped.items():
        logger.warning(
            "Dropped %d of %d %s pairs %s (first: %s): %s.",
            len(locations),
            total,
            name,
            reason,
            locations[0],
            DroppedPair.WHY[reason],
        )
    if notes.hh_split:
        logger.info(
            "Split %d HH-RLHF pairs after their last %r turn marker; in %d of them the responses start with the "
            "same words, which a longest-common-prefix split would have moved into the prompt.",
            notes.hh_split,
            HH_ASSISTANT,
            notes.hh_prefix_differs,
        )
    logger.info(
        "Loaded %d %s %s pairs from %s",
        len(rows),
        name,
        "conversational" if conversational else "plain-text",
        source.describe(),
    )
    return Dataset.from_list(rows)


def _pair_key(row: dict[str, Any]) -> str:
    """The same prompt and the same two responses (in either order) give the same key."""
    responses = sorted(json.dumps(row[k], sort_keys=True, ensure_ascii=False) for k in ("chosen", "rejected"))
    return json.dumps([row["prompt"], responses], sort_keys=True, ensure_ascii=False)


def warn_if_outside_chat_template(pairs, tokenizer, path: str) -> None:
    """A warning for plain-text pairs and a model with a chat template: TRL applies the template to message lists
    only, so such pairs train the model on raw text, outside the template it is served in (and the instruction
    goes in front of the prompt's text, not in a system message)."""
    if isinstance(pairs[0]["prompt"], str) and getattr(tokenizer, "chat_template", None):
        logger.warning(
            "The pairs in %s are plain text, and the model has a chat template: they train it outside the "
            'template it answers in. Write each prompt and response as a list of messages ({"role": "user", '
            '"content": ...}) to train within it.',
            path,
        )


def load_train_and_test(data_args):
    """The train pairs and the test pairs (None without a test path) of `DataArguments`, checked together.

    A TEST_DATASET_PATH folder gives the test split matching DATASET_SPLIT (`matching_test_split`). Test pairs
    that also appear in the training pairs are counted in a warning: metrics on them are not held out.
    """
    from .config import DataArguments

    train = load_preference_dataset(data_args.train_dataset_path, data_args.dataset_split, "train")
    if not data_args.test_dataset_path:
        return train, None
    test = load_preference_dataset(data_args.test_dataset_path, matching_test_split(data_args.dataset_split), "test")
    seen = {_pair_key(row) for row in train}
    overlap = sum(_pair_key(row) in seen for row in test)
    if overlap:
        logger.warning(
            "%d of %d test pairs also appear in the training pairs (same prompt and responses): held-out metrics "
            "overstate what the model learned; remove them from one of the two sets.",
            overlap,
            len(test),
        )
    defaults = DataArguments()
    embedded = Path(defaults.train_dataset_path).resolve().parent
    train_path = Path(data_args.train_dataset_path).resolve()
    if Path(data_args.test_dataset_path).resolve() == Path(defaults.test_dataset_path).resolve() and not (
        train_path == embedded or embedded in train_path.parents
    ):
        logger.warning(
            "TEST_DATASET_PATH is the embedded example test set while TRAIN_DATASET_PATH is %s: held-out metrics "
            "measure the example data. Set TEST_DATASET_PATH to your held-out pairs, or empty for no evaluation.",
            data_args.train_dataset_path,
        )
    return train, test
