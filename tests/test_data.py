"""Loading every accepted file type and row shape, and the errors for bad rows."""

import json

import pytest

from preference_dpo.data import load_preference_dataset, normalize_row
from preference_dpo.errors import UserInputError

from .conftest import EMBEDDED_TRAIN, write_jsonl

USER = {"role": "user", "content": "What color is the sky?"}
GOOD = {"role": "assistant", "content": "It is blue."}
BAD = {"role": "assistant", "content": "It is green."}


def test_standard_shape_passes_through():
    row = normalize_row({"prompt": "Q?", "chosen": " yes", "rejected": " no", "extra": 1}, "f line 1")
    assert row == {"prompt": "Q?", "chosen": " yes", "rejected": " no"}


def test_conversational_shape():
    row = normalize_row({"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}, "f line 1")
    assert row == {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}


def test_ultrafeedback_binarized_shape_takes_shared_turns_as_prompt():
    raw = {"prompt": USER["content"], "chosen": [USER, GOOD], "rejected": [USER, BAD], "score_chosen": 8.0}
    assert normalize_row(raw, "f line 1") == {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}
    del raw["prompt"]  # prompt missing: same result
    assert normalize_row(raw, "f line 1") == {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}


def test_string_prompt_with_assistant_only_turns_becomes_a_user_message():
    row = normalize_row({"prompt": "Hi", "chosen": [GOOD], "rejected": [BAD]}, "f line 1")
    assert row["prompt"] == [{"role": "user", "content": "Hi"}]


def test_hh_rlhf_implicit_prompt_is_cut_at_a_word_boundary():
    chosen = "\n\nHuman: What is 2+2?\n\nAssistant: It is four."
    rejected = "\n\nHuman: What is 2+2?\n\nAssistant: It's five, I think."
    row = normalize_row({"chosen": chosen, "rejected": rejected}, "f line 1")
    assert row["prompt"] == "\n\nHuman: What is 2+2?\n\nAssistant:"
    assert row["chosen"] == " It is four."
    assert row["rejected"] == " It's five, I think."


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "Q", "rejected": "no"}, "line 3: missing field 'chosen'"),
        ({"prompt": "Q", "chosen": "yes", "rejected": "  "}, "line 3: field 'rejected' is empty"),
        ({"prompt": "Q", "chosen": 5, "rejected": "no"}, "field 'chosen' must be a string or a list"),
        ({"prompt": "Q", "chosen": "yes", "rejected": [BAD]}, "both be strings or both message lists"),
        ({"chosen": [GOOD], "rejected": [BAD]}, "'prompt' must be a non-empty list"),
        ({"chosen": "abc", "rejected": "xyz"}, "share no prefix"),
        ({"prompt": "", "chosen": "a", "rejected": "b"}, "field 'prompt' is empty"),
        ([1, 2], "each row must be a JSON object"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, row, message):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "P", "chosen": "a", "rejected": "b"}] * 2 + [row])
    with pytest.raises(UserInputError, match=message) as info:
        load_preference_dataset(path)
    assert str(path) in str(info.value)


def test_malformed_json_line_is_named(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "P", "chosen": "a", "rejected": "b"}\n{"prompt": oops}\n')
    with pytest.raises(UserInputError, match=r"pairs.jsonl line 2: not valid JSON"):
        load_preference_dataset(path)


def test_empty_file_and_mixed_shapes_and_bad_suffix(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(UserInputError, match="holds no preference pairs"):
        load_preference_dataset(empty)
    mixed = write_jsonl(
        tmp_path / "mixed.jsonl",
        [{"prompt": "P", "chosen": "a", "rejected": "b"}, {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}],
    )
    with pytest.raises(UserInputError, match="line 2: mixes conversational"):
        load_preference_dataset(mixed)
    csv = tmp_path / "pairs.csv"
    csv.write_text("a,b\n")
    with pytest.raises(UserInputError, match="unsupported file type '.csv'"):
        load_preference_dataset(csv)
    with pytest.raises(UserInputError, match="no such file"):
        load_preference_dataset(tmp_path / "missing.jsonl")
    with pytest.raises(UserInputError, match="folder holds no .jsonl"):
        load_preference_dataset(tmp_path / "..")  # a folder with no data files


def test_json_parquet_and_save_to_disk_load_the_same_pairs(tmp_path):
    from datasets import Dataset

    rows = [json.loads(line) for line in EMBEDDED_TRAIN.read_text().splitlines()[:10]]
    reference = load_preference_dataset(write_jsonl(tmp_path / "pairs.jsonl", rows)).to_list()
    (tmp_path / "pairs.json").write_text(json.dumps(rows))
    Dataset.from_list(rows).to_parquet(str(tmp_path / "pairs.parquet"))
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for name in ("pairs.json", "pairs.parquet", "saved"):
        assert load_preference_dataset(tmp_path / name).to_list() == reference, name
    assert reference[0]["prompt"][0]["role"] == "user"
    assert reference[0]["chosen"][0]["role"] == "assistant"
