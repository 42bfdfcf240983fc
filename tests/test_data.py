"""Loading every accepted file type and row shape, and the errors for bad rows."""

import json

import pytest

from preference_dpo.data import load_preference_dataset, normalize_row
from preference_dpo.errors import UserInputError

from .conftest import EMBEDDED_TEST, EMBEDDED_TRAIN, REPO, write_jsonl

DATA = REPO / "tests" / "data"

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
    (tmp_path / "no_data").mkdir()
    (tmp_path / "no_data" / "notes.txt").write_text("not data")
    with pytest.raises(UserInputError, match="folder holds no .jsonl"):
        load_preference_dataset(tmp_path / "no_data")


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


# --- data as people have it (tests/data/README.md lists the files) -----------------------------------


def _data_args(train, test=None, split="train"):
    from preference_dpo.config import DataArguments

    return DataArguments(train_dataset_path=str(train), test_dataset_path=test and str(test), dataset_split=split)


def test_a_folder_is_one_split_and_the_log_lists_its_files(caplog, monkeypatch):
    monkeypatch.chdir(DATA)  # a relative folder, as users write it: files are named relative to it too
    caplog.set_level("INFO", logger="preference_dpo.data")
    assert len(load_preference_dataset("folder_splits")) == 3  # train.jsonl only, not test.jsonl
    assert "from folder_splits (split 'train': 1 file: train.jsonl)" in caplog.text
    assert "test.jsonl" not in caplog.text


@pytest.mark.parametrize("test_path", ["folder", "file"])
def test_train_and_test_from_one_folder_and_overlap_is_counted(caplog, test_path):
    from preference_dpo.data import load_train_and_test

    folder = DATA / "folder_splits"
    caplog.set_level("INFO", logger="preference_dpo.data")
    train, test = load_train_and_test(_data_args(folder, folder if test_path == "folder" else folder / "test.jsonl"))
    assert (len(train), len(test)) == (3, 2)
    assert "1 of 2 test pairs also appear in the training pairs" in caplog.text


def test_test_split_follows_the_train_split():
    from preference_dpo.data import matching_test_split

    assert [matching_test_split(s) for s in ("train", "train_prefs", "train_sft", "dpo")] == [
        "test",
        "test_prefs",
        "test_sft",
        "test",
    ]


@pytest.mark.parametrize("layout", ["top", "data"])
def test_hub_folder_needs_a_named_split(tmp_path, caplog, layout):
    import shutil

    from preference_dpo.data import load_train_and_test

    folder = DATA / "hub_folder"
    if layout == "data":  # the Hub's own layout: data/<split>-00000-of-00001.parquet
        folder = tmp_path / "hub"
        shutil.copytree(DATA / "hub_folder", folder / "data")
        shutil.move(folder / "data" / "README.md", folder / "README.md")
    with pytest.raises(UserInputError, match=r"no split 'train'.*test_prefs, train_prefs, train_sft.*DATASET_SPLIT"):
        load_preference_dataset(folder)
    caplog.set_level("INFO", logger="preference_dpo.data")
    train, test = load_train_and_test(_data_args(folder, folder, split="train_prefs"))
    assert (len(train), len(test)) == (2, 1)
    assert "train_prefs-00000-of-00001.parquet" in caplog.text and "train_sft" not in caplog.text
    assert "test_prefs-00000-of-00001.parquet" in caplog.text


def test_saved_dataset_dict_split(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = [{"prompt": "Q", "chosen": "a", "rejected": "b"}]
    DatasetDict({"train_prefs": Dataset.from_list(rows * 2), "test_prefs": Dataset.from_list(rows)}).save_to_disk(
        str(tmp_path / "saved")
    )
    assert len(load_preference_dataset(tmp_path / "saved", split="train_prefs")) == 2
    with pytest.raises(UserInputError, match=r"no split 'train'.*test_prefs, train_prefs"):
        load_preference_dataset(tmp_path / "saved")


def test_a_folder_without_split_names_is_one_data_set(tmp_path):
    write_jsonl(tmp_path / "part_a.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b"}])
    write_jsonl(tmp_path / "part_b.jsonl", [{"prompt": "R", "chosen": "a", "rejected": "b"}])
    assert len(load_preference_dataset(tmp_path)) == 2
    assert len(load_preference_dataset(tmp_path, split="test", name="test")) == 2


def test_embedded_test_set_with_own_training_data_is_warned(caplog):
    from preference_dpo.data import load_train_and_test

    load_train_and_test(_data_args(DATA / "identical_plain.jsonl", EMBEDDED_TEST))
    assert "TEST_DATASET_PATH is the embedded example test set" in caplog.text
    caplog.clear()
    load_train_and_test(_data_args(EMBEDDED_TRAIN.parent, EMBEDDED_TEST))  # the embedded folder: no warning
    assert "embedded example test set" not in caplog.text


def test_utf8_with_bom_and_crlf_is_read():
    rows = load_preference_dataset(DATA / "bom_crlf.jsonl").to_list()
    assert rows[0] == {"prompt": "如何煮鸡蛋？", "chosen": "把鸡蛋放入沸水中煮九分钟。", "rejected": "不知道。"}
    assert rows[1]["chosen"] == "Hi! 👋"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("latin1.jsonl", r"latin1.jsonl line 1: not UTF-8 text \(byte 0xE9 at column 28\)"),
        ("utf16.jsonl", r"utf16.jsonl: UTF-16 text \(it starts with a UTF-16 byte-order mark, as Windows PowerShell"),
    ],
)
def test_other_encodings_are_refused_in_one_line(name, message):
    with pytest.raises(UserInputError, match=message) as info:
        load_preference_dataset(DATA / name)
    assert len(info.value.problems) == 1 and "\n" not in info.value.problems[0]
    assert "save it as UTF-8" in info.value.problems[0]


@pytest.mark.parametrize(
    ("name", "line"),
    [("identical_plain.jsonl", 2), ("identical_hh.jsonl", 1), ("identical_conversation.jsonl", 3)],
)
def test_identical_responses_are_dropped_and_counted_in_every_shape(caplog, name, line):
    rows = load_preference_dataset(DATA / name).to_list()
    assert len(rows) == 2 and all(r["chosen"] != r["rejected"] for r in rows)
    assert (
        f"Dropped 1 of 3 train pairs whose 'chosen' and 'rejected' are identical (first: {DATA / name} line {line})"
        in caplog.text
    )


def test_all_identical_is_an_error():
    with pytest.raises(
        UserInputError, match=r"all 2 pairs .*all_identical.jsonl have identical 'chosen' and 'rejected'"
    ):
        load_preference_dataset(DATA / "all_identical.jsonl")


def test_hh_transcripts_split_at_the_last_assistant_turn(caplog):
    caplog.set_level("INFO", logger="preference_dpo.data")
    rows = load_preference_dataset(DATA / "hh_shared_words.jsonl").to_list()
    assert len(rows) == 2  # line 3's conversations differ before the last Assistant turn
    assert rows[0] == {
        "prompt": "\n\nHuman: I failed my exam. What now?\n\nAssistant:",
        "chosen": " I think you should read the feedback and retake it.",
        "rejected": " I think you should give up.",
    }
    assert rows[1]["prompt"].endswith("\n\nHuman: Why?\n\nAssistant:") and rows[1]["prompt"].count("Assistant:") == 2
    assert rows[1]["chosen"] == " Rivers carry dissolved minerals into it."
    assert "in 1 of them the responses start with the same words" in caplog.text
    assert "Dropped 1 of 3 train pairs whose conversations differ before the last" in caplog.text
    assert f"{DATA / 'hh_shared_words.jsonl'} line 3" in caplog.text


def test_openai_content_parts_are_joined_and_null_keys_ignored():
    rows = load_preference_dataset(DATA / "content_parts.jsonl").to_list()
    assert rows == [
        {
            "prompt": [{"role": "user", "content": "Describe the sky.\nOne line."}],
            "chosen": [{"role": "assistant", "content": "Blue and wide."}],
            "rejected": [{"role": "assistant", "content": "Green."}],
        }
    ]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("tool_calls.jsonl", r"tool_calls.jsonl line 2: chosen\[1\] has key 'tool_calls', which is not supported"),
        ("image_part.jsonl", r"image_part.jsonl line 1: prompt\[0\].content\[1\] is a part of type 'image_url'"),
    ],
)
def test_unsupported_message_keys_and_parts_are_named(name, message):
    with pytest.raises(UserInputError, match=message):
        load_preference_dataset(DATA / name)


def test_string_prompt_is_checked_like_a_list_prompt():
    with pytest.raises(UserInputError, match=r"prompt_mismatch.jsonl line 2: 'prompt' \('Plan a picnic.'\) is not"):
        load_preference_dataset(DATA / "prompt_mismatch.jsonl")


def test_null_is_reported_as_null():
    with pytest.raises(UserInputError, match=r"null_field.jsonl line 2: field 'rejected' is null"):
        load_preference_dataset(DATA / "null_field.jsonl")


def test_plain_text_pairs_for_a_chat_model_are_warned(tmp_path, caplog):
    from types import SimpleNamespace

    from preference_dpo.data import warn_if_outside_chat_template

    plain = load_preference_dataset(DATA / "identical_plain.jsonl")
    conversational = load_preference_dataset(DATA / "identical_conversation.jsonl")
    chat, base = SimpleNamespace(chat_template="{{ messages }}"), SimpleNamespace(chat_template=None)
    warn_if_outside_chat_template(plain, chat, "pairs.jsonl")
    assert "The pairs in pairs.jsonl are plain text, and the model has a chat template" in caplog.text
    caplog.clear()
    warn_if_outside_chat_template(plain, base, "pairs.jsonl")  # a base model: raw text is its shape
    warn_if_outside_chat_template(conversational, chat, "pairs.jsonl")  # message lists: rendered in the template
    assert caplog.text == ""
