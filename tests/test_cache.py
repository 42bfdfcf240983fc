"""The cache's keys: a changed data file, tokenizer, instruction or model is recomputed; BETA, ALPHA and
the learning rate reuse what an earlier run computed (tokenized views and reference log-probs)."""

import json
import logging
import os
import shutil

import pytest
import torch

from preference_dpo.cache import DatasetCache
from preference_dpo.collator import PreferenceViewsCollator
from preference_dpo.config import DataArguments, ModelArguments, PreferenceDPOConfig
from preference_dpo.data import load_preference_dataset
from preference_dpo.pipeline import tokenized_views
from preference_dpo.trainer import PreferenceGuidedDPOTrainer

from .conftest import write_jsonl

P = "Please provide a helpful, honest, harmless and concise answer."


def train_args(tmp_path, **overrides):
    return PreferenceDPOConfig(
        output_dir=str(tmp_path / "out"),
        log_dir=str(tmp_path / "logs"),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        max_steps=1,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        **{"seed": 0, "align_loss": "hinge", **overrides},  # the form these tests were written against
    )


@pytest.fixture
def data(tmp_path, small_data):
    """Copies of the small data files, so a test may change them."""
    train, test = (shutil.copy(path, tmp_path / path.name) for path in small_data)
    return DataArguments(train_dataset_path=str(train), test_dataset_path=str(test))


@pytest.fixture
def builds(monkeypatch):
    """Counts tokenizations (cache misses) of the data sets."""
    import preference_dpo.views as views

    calls = []
    original = views.tokenize_preference_dataset

    def counting(*args, **kwargs):
        calls.append(kwargs["name"])
        return original(*args, **kwargs)

    monkeypatch.setattr(views, "tokenize_preference_dataset", counting)
    return calls


def views_of(tmp_path, data, tokenizer, cache_root, split="train", text=P, **overrides):
    args = train_args(tmp_path, **overrides)
    settings = {
        "preference_text": text,
        "preference_position": "system",
        "num_soft_tokens": 0,
        "max_length": args.max_length,
        "max_prompt_length": args.max_prompt_length,
        "num_proc": None,
    }
    cache = DatasetCache(cache_root, args.cache, tmp_path / "out" / ".tokenized")
    path = data.train_dataset_path if split == "train" else data.test_dataset_path
    raw = load_preference_dataset(path, name=split)
    return tokenized_views(split, path, raw, data, tokenizer, settings, args, cache)


def test_tokenized_views_are_reused_unless_data_tokenizer_or_instruction_change(tmp_path, data, tokenizer, builds):
    cache = tmp_path / "cache"
    first, meta = views_of(tmp_path, data, tokenizer, cache)
    assert builds == ["train"] and meta["loaded"] == 48
    again, _ = views_of(tmp_path, data, tokenizer, cache, beta=0.3, aligned_loss_weight=1.0, learning_rate=1e-3)
    assert builds == ["train"]  # BETA, ALPHA, LR: the same entry
    assert again._fingerprint == first._fingerprint and again["chosen_ids"] == first["chosen_ids"]

    views_of(tmp_path, data, tokenizer, cache, text="Answer politely.")
    assert builds == ["train", "train"]  # another instruction

    rows = [json.loads(line) for line in open(data.train_dataset_path, encoding="utf-8")]
    rows[0]["chosen"][-1]["content"] += " Really."
    write_jsonl(tmp_path / "train.jsonl", rows)
    changed, _ = views_of(tmp_path, data, tokenizer, cache)
    assert builds == ["train"] * 3  # another data file content, same path
    assert changed._fingerprint != first._fingerprint

    other_tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    other_tokenizer.chat_template = tokenizer.chat_template.replace("<|im_start|>system", "<|im_start|>system ")
    views_of(tmp_path, data, other_tokenizer, cache)
    assert builds == ["train"] * 4  # another tokenizer

    views_of(tmp_path, data, tokenizer, cache, cache=False)
    views_of(tmp_path, data, tokenizer, cache, cache=False)
    assert builds == ["train"] * 6  # CACHE=false: always rebuilt
    assert (tmp_path / "out" / ".tokenized" / "train").is_dir()  # in the run's own folder, not the cache


def test_entries_are_keyed_on_file_content_not_paths(tmp_path, data, tokenizer, builds):
    """The key holds a data file's content, not where it is: a copy elsewhere (another name too) reuses the entry,
    an edited train file at a new path leaves the test split's entry in use, and changed content is rebuilt."""
    cache = tmp_path / "cache"
    views_of(tmp_path, data, tokenizer, cache)
    views_of(tmp_path, data, tokenizer, cache, split="test")
    assert builds == ["train", "test"]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    copy = shutil.copy(data.train_dataset_path, elsewhere / "my_pairs.jsonl")
    moved = DataArguments(train_dataset_path=str(copy), test_dataset_path=data.test_dataset_path)
    views_of(tmp_path, moved, tokenizer, cache)
    assert builds == ["train", "test"]  # the same content at another path: reused

    rows = [json.loads(line) for line in open(data.train_dataset_path, encoding="utf-8")]
    rows[0]["chosen"][-1]["content"] += " Really."
    edited = DataArguments(
        train_dataset_path=str(write_jsonl(elsewhere / "train_v2.jsonl", rows)),
        test_dataset_path=data.test_dataset_path,
    )
    views_of(tmp_path, edited, tokenizer, cache, split="test")
    assert builds == ["train", "test"]  # only the train file changed: the test split's entry is still good
    views_of(tmp_path, edited, tokenizer, cache)
    assert builds == ["train", "test", "train"]  # the changed file itself is rebuilt


def perturbed_copy(model_dir, target):
    """The tiny model with one weight changed: another reference model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.model.norm.weight.add_(0.01)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(target)
    return target


def test_model_digest_tells_models_apart_by_their_files(tmp_path, tiny_model_dir, monkeypatch):
    """Under ZeRO-3 TRL hashes already-sharded weights, alike for every model of one shape: the files decide. Their
    content is read once: the digest is kept beside the cache, keyed on the files' metadata."""
    import preference_dpo.cache as cache_module
    from preference_dpo.cache import model_digest

    stamps = tmp_path / "stamps"
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    digest = model_digest(str(copy), stamps=stamps)
    assert digest == model_digest(str(tiny_model_dir), stamps=stamps)  # same files, another folder
    assert model_digest(str(perturbed_copy(tiny_model_dir, tmp_path / "other")), stamps=stamps) != digest
    monkeypatch.setattr(cache_module, "digest_path", lambda path: pytest.fail(f"read {path} again"))
    assert model_digest(str(copy), stamps=stamps) == digest  # from its stamp: no file read
    assert model_digest(str(copy)) != model_digest(str(tiny_model_dir))  # no stamps (CACHE=false): the metadata
    monkeypatch.undo()
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    changed = model_digest(str(copy), stamps=stamps)
    assert changed != digest  # a file changed: read again
    # rewritten in place, same size, its modification time restored (as `cp -p` or `rsync -a` leave it)
    weights = copy / "model.safetensors"
    before, content = weights.stat(), bytearray(weights.read_bytes())
    content[-1] ^= 1
    weights.write_bytes(bytes(content))
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert weights.stat().st_size == before.st_size and weights.stat().st_mtime_ns == before.st_mtime_ns
    assert model_digest(str(copy), stamps=stamps) != changed


def test_reference_log_probs_are_reused_unless_the_model_changes(
    tmp_path, data, tokenizer, tiny_model_dir, monkeypatch, caplog
):
    from transformers import AutoModelForCausalLM
    from trl import get_peft_config

    cache = tmp_path / "cache"
    train, _ = views_of(tmp_path, data, tokenizer, cache)
    test, _ = views_of(tmp_path, data, tokenizer, cache, split="test")
    passes = []
    original = PreferenceGuidedDPOTrainer.compute_ref_log_probs

    def counting(self, model, inputs):
        passes.append(inputs["input_ids"].shape[0] // 2)  # rows: chosen..., rejected...
        return original(self, model, inputs)

    monkeypatch.setattr(PreferenceGuidedDPOTrainer, "compute_ref_log_probs", counting)

    def trainer(model_dir, lora_r=16, **overrides):
        args = train_args(tmp_path, **overrides)
        return PreferenceGuidedDPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(model_dir),
            args=args,
            data_collator=PreferenceViewsCollator(pad_token_id=tokenizer.pad_token_id, max_length=args.max_length),
            train_dataset=train,
            eval_dataset=test,
            processing_class=tokenizer,
            peft_config=get_peft_config(ModelArguments(model_name_or_path=str(model_dir), lora_r=lora_r)),
        )

    first = trainer(tiny_model_dir)
    assert sum(passes) == 48 + 16  # every train and test pair once
    passes.clear()
    with caplog.at_level(logging.INFO, logger="preference_dpo.cache"):
        rerun = trainer(tiny_model_dir, beta=0.3, aligned_loss_weight=1.0, learning_rate=1e-3)
    assert passes == []  # BETA, ALPHA, LR changed: no reference pass
    assert "Reused the reference log-probs of the train pairs from the cache: no reference pass" in caplog.text
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        assert rerun.train_dataset[column] == first.train_dataset[column]
    trainer(tiny_model_dir, seed=1, lora_r=8)
    assert passes == []  # the adapter's random start is not the reference: reused
    trainer(tiny_model_dir, ld_alpha=0.5)
    assert sum(passes) == 48 + 16  # TRL weighs the reference's tokens past the shorter response otherwise
    passes.clear()

    other = perturbed_copy(tiny_model_dir, tmp_path / "other_model")
    changed = trainer(other)
    assert sum(passes) == 48 + 16  # another model: recomputed
    assert changed.train_dataset["ref_chosen_logps"] != first.train_dataset["ref_chosen_logps"]


def test_ref_hinge_targets_are_reused(tmp_path, data, tokenizer, tiny_model_dir, monkeypatch):
    """The reference's guided-view columns (ALIGN_LOSS=ref_hinge) are cached beside the data set too."""
    from transformers import AutoModelForCausalLM

    cache = tmp_path / "cache"
    train, _ = views_of(tmp_path, data, tokenizer, cache)
    computed = []
    original = PreferenceGuidedDPOTrainer._ref_guided_columns

    def counting(self, dataset, name):
        computed.append(name)
        return original(self, dataset, name)

    monkeypatch.setattr(PreferenceGuidedDPOTrainer, "_ref_guided_columns", counting)
    from trl.trainer import dpo_trainer

    hashed = []
    trl_hash = dpo_trainer.hash_module
    monkeypatch.setattr(dpo_trainer, "hash_module", lambda module: hashed.append(1) or trl_hash(module))

    def trainer(**overrides):
        args = train_args(tmp_path, align_loss="ref_hinge", **overrides)
        return PreferenceGuidedDPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
            args=args,
            data_collator=PreferenceViewsCollator(pad_token_id=tokenizer.pad_token_id, max_length=args.max_length),
            train_dataset=train,
            processing_class=tokenizer,
        )

    first = trainer()
    assert computed == ["train"]
    again = trainer(aligned_loss_weight=0.5, beta=0.2)
    assert computed == ["train"]  # reused
    assert again.train_dataset["ref_guided_chosen_logps"] == first.train_dataset["ref_guided_chosen_logps"]
    trainer(guided_forward="full")
    assert computed == ["train", "train"]  # computed another way: not reused
    assert hashed == []  # TRL's own hash of every weight, on every rank, is skipped: `_reference_key` replaces it


def test_reruns_with_another_seed_and_lora_r_reuse_the_reference_and_state_the_pair_counts(
    tiny_model_dir, small_data, tmp_path, capsys
):
    """The reference is the base model: SEED and LORA_R (the adapter's random start) reuse its log-probs. A reuse
    states again how many pairs were dropped and truncated (from the cache entry: nothing is tokenized)."""
    from .test_reliability import run_main

    train, test = small_data
    argv = [
        "--model_name_or_path", str(tiny_model_dir), "--train_dataset_path", str(train), "--test_dataset_path", str(test),
        "--output_dir", str(tmp_path / "out"), "--log_dir", str(tmp_path / "logs"), "--cache_dir", str(tmp_path / "cache"),
        "--max_steps", "1", "--eval_strategy", "no", "--num_sample_prompts", "0", "--overwrite", "true",
        "--max_length", "100", "--max_prompt_length", "58",
    ]  # fmt: skip
    computed = "Computing the reference log-probs of the train pairs"
    reused = "Reused the reference log-probs of the train pairs from the cache: no reference pass"
    code, errors, log = run_main([*argv, "--seed", "0", "--lora_r", "8"], capsys, full_log=True)
    assert code == 0 and computed in log, errors
    counts = [
        line.split(": ", 1)[-1] for line in log.splitlines() if "pairs whose prompt" in line or "Truncated" in line
    ]
    assert any("train pairs whose prompt" in line for line in counts), counts  # dropped over MAX_PROMPT_LENGTH
    assert any("train pairs to fit MAX_LENGTH" in line for line in counts), counts

    code, _, log = run_main([*argv, "--seed", "1", "--lora_r", "16"], capsys, full_log=True)
    assert code == 0 and reused in log and computed not in log
    assert all(line in log for line in counts)  # stated again, from the cache entry
