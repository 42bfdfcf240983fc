"""Parsing, validation messages, and the launcher agreeing with the Python defaults."""

import dataclasses
import logging
import os
import shlex
import subprocess

import pytest

from preference_dpo.config import parse_args
from preference_dpo.errors import UserInputError
from preference_dpo.variables import LAUNCHER_VARIABLES

from .conftest import REPO

LAUNCHER = REPO / "fast_train.sh"


@pytest.fixture(autouse=True)
def _in_empty_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default output folders are relative: keep them away from real runs


@pytest.fixture
def model_dir(tiny_model_dir):
    return ["--model_name_or_path", str(tiny_model_dir)]


def test_every_problem_is_reported_at_once_naming_variable_and_flag(model_dir):
    with pytest.raises(UserInputError) as info:
        parse_args(
            [
                *model_dir,
                "--beta",
                "0",
                "--aligned_loss_weight",
                "-1",
                "--learning_rate",
                "0",
                "--lora_r",
                "0",
                "--lora_dropout",
                "1.5",
                "--max_length",
                "100",
                "--max_prompt_length",
                "100",
                "--gradient_accumulation_steps",
                "0",
                "--preference_text",
                "  ",
            ]
        )
    text = str(info.value)
    for expected in (
        "BETA (--beta) must be > 0; got 0.0",
        "ALPHA (--aligned_loss_weight) must be >= 0; got -1.0",
        "LEARNING_RATE (--learning_rate) must be > 0",
        "LORA_R (--lora_r) must be >= 1; got 0",
        "LORA_DROPOUT (--lora_dropout) must be in [0, 1); got 1.5",
        "MAX_PROMPT_LENGTH (--max_prompt_length) must be >= 1 and < MAX_LENGTH (--max_length); got 100 and 100",
        "GRADIENT_ACCUM_STEPS (--gradient_accumulation_steps) must be >= 1; got 0",
        "PREFERENCE_TEXT (--preference_text) is empty",
    ):
        assert expected in text
    assert len(info.value.problems) == 8


def test_missing_paths_and_embedding_requirements(model_dir, tmp_path):
    with pytest.raises(UserInputError) as info:
        parse_args(
            [
                *model_dir,
                "--train_dataset_path",
                str(tmp_path / "nope.jsonl"),
                "--test_dataset_path",
                str(tmp_path / "nope2.jsonl"),
                "--training_mode",
                "embedding",
            ]
        )
    text = str(info.value)
    assert "TRAIN_DATASET_PATH (--train_dataset_path): no such file or folder" in text
    assert "TEST_DATASET_PATH (--test_dataset_path): no such file or folder" in text
    assert "PROMPT_EMBEDDING_PATH (--prompt_embedding_path) is required in embedding mode" in text
    with pytest.raises(UserInputError, match="POLICY_MODEL_PATH .* no such model folder"):
        parse_args(["--model_name_or_path", str(tmp_path / "missing_model")])


def test_unusual_but_legal_values_warn(model_dir, caplog):
    with caplog.at_level(logging.WARNING):
        _, _, train = parse_args([*model_dir, "--beta", "0.6"])
    assert train.beta == 0.6
    assert "BETA (--beta) = 0.6 is outside the usual range" in caplog.text


def test_defaults_resolve_outputs_from_run_name_and_fp32_on_cpu(model_dir):
    _, model, train = parse_args([*model_dir, "--run_name", "exp1"])
    assert train.output_dir == os.path.join("model_output", "exp1")
    assert train.log_dir == os.path.join("logs", "exp1")
    assert (train.bf16, train.fp16) == (False, False)  # no GPU here
    assert model.use_peft and model.lora_target_modules == "all-linear"
    assert train.precompute_ref_log_probs


def test_no_pinned_memory_without_an_accelerator(model_dir):
    """Pinning does nothing without an accelerator, and torch warns about it for every DataLoader."""
    import torch

    if torch.accelerator.is_available():
        pytest.skip("an accelerator is present: pinned memory stays on")
    _, _, train = parse_args(model_dir)
    assert train.dataloader_pin_memory is False


def launcher_command(env: dict) -> list[str]:
    out = subprocess.run(
        ["bash", str(LAUNCHER)], env={**os.environ, "DRY_RUN": "1", **env}, capture_output=True, text=True, check=True
    )
    return shlex.split(out.stdout)


def test_launcher_defaults_equal_python_defaults(tiny_model_dir):
    """Each default is written twice (launcher block, dataclass); this keeps them from drifting."""
    argv = launcher_command({"DEVICE": "cpu"})
    assert argv[1].endswith("train_with_preference_prompt.py")
    flags = argv[2:]
    from preference_dpo.config import ModelArguments

    # The embedded model may not be built yet: compare its path, then point both sides at a built one.
    model_flag = flags.index("--model_name_or_path") + 1
    assert flags[model_flag] == ModelArguments().model_name_or_path
    flags[model_flag] = str(tiny_model_dir)
    launched = parse_args(flags)
    defaults = parse_args(["--model_name_or_path", str(tiny_model_dir)])
    for a, b in zip(launched, defaults, strict=True):
        for f in dataclasses.fields(a):
            if f.name in ("logging_dir", "log_file"):  # the launcher passes its own log file
                continue
            left, right = getattr(a, f.name), getattr(b, f.name)
            if f.name in ("output_dir", "log_dir", "ptune_output_dir"):
                left, right = os.path.normpath(left), os.path.normpath(right)
            assert left == right, f.name
    # every launcher variable in the table is passed by the launcher
    passed = {flag.removeprefix("--") for flag in flags if flag.startswith("--")}
    # passed when set; empty: the form's own
    optional = {
        "reference_model_path",
        "prompt_embedding_path",
        "distill_top_k",
        "distill_reduction",
        "aligned_loss_weight",
    }
    assert set(LAUNCHER_VARIABLES.values()) - optional <= passed


def test_launcher_overrides_from_environment_and_gpu_command():
    argv = launcher_command(
        {
            "DEVICE": "gpu",
            "GPU_NODES": "localhost:1,2",
            "BETA": "0.1",
            "ALPHA": "0.2",
            "PREFERENCE_TEXT": "请提供一个有用、诚实、无害且简洁的回答。",
            "ALIGN_LOSS": "ref_distill",
            "DISTILL_TOP_K": "16",
            "DISTILL_REDUCTION": "sequence_sum",
        }
    )
    assert argv[:3] == ["env", "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True", "deepspeed"]
    assert "--include=localhost:1,2" in argv
    assert argv[argv.index("--deepspeed") + 1].endswith("ds_config.json")
    assert argv[argv.index("--beta") + 1] == "0.1"
    assert argv[argv.index("--aligned_loss_weight") + 1] == "0.2"
    assert argv[argv.index("--preference_text") + 1] == "请提供一个有用、诚实、无害且简洁的回答。"
    assert argv[argv.index("--distill_top_k") + 1] == "16"
    assert argv[argv.index("--distill_reduction") + 1] == "sequence_sum"


@pytest.mark.parametrize("form", ["onpolicy_distill", "context_distill"])
def test_the_answer_forms_refuse_what_they_cannot_run(model_dir, form):
    """The forms that score answers through the frozen reference refuse, before any weight loads, ZeRO-3, the
    full guided layout and a run with no reference (no LoRA, no REFERENCE_MODEL_PATH), each naming the fix."""
    from preference_dpo.config import validate

    flags = [*model_dir, "--align_loss", form]
    data, model, train = parse_args(flags)
    validate(data, model, train)
    train.deepspeed = str(REPO / "ds_config_zero3.json")
    with pytest.raises(UserInputError, match=rf"ALIGN_LOSS \(--align_loss\)={form} is not supported with ZeRO-3"):
        validate(data, model, train)
    with pytest.raises(UserInputError, match=rf"{form} needs --guided_forward shared_prompt"):
        parse_args([*flags, "--guided_forward", "full"])
    with pytest.raises(UserInputError, match=r"without LoRA has no frozen reference .* REFERENCE_MODEL_PATH"):
        parse_args([*flags, "--use_peft", "false"])


def test_launcher_is_bash_n_clean():
    subprocess.run(["bash", "-n", str(LAUNCHER)], check=True)


def test_merge_adapter_is_refused_under_zero3(model_dir):
    from preference_dpo.config import validate

    data, model, train = parse_args([*model_dir, "--merge_adapter", "true"])
    train.deepspeed = str(REPO / "ds_config_zero3.json")  # as the launcher passes it with ZERO_STAGE=3
    with pytest.raises(UserInputError, match=r"MERGE_ADAPTER \(--merge_adapter\) is not supported with ZeRO-3"):
        validate(data, model, train)
    train.deepspeed = str(REPO / "ds_config.json")
    validate(data, model, train)  # ZeRO-2 keeps whole weights on every rank: merging is fine


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], ("ref_distill", 1.0, 16, "sequence_sum")),
        (["--align_loss", "hinge"], ("hinge", 0.1, None, "token_mean")),
        (["--align_loss", "ref_hinge"], ("ref_hinge", 0.1, None, "token_mean")),
        (["--align_loss", "distill"], ("distill", 1.0, None, "token_mean")),
        (["--align_loss", "onpolicy_distill"], ("onpolicy_distill", 1.0, None, "token_mean")),
        (["--align_loss", "context_distill"], ("context_distill", 1.0, None, "token_mean")),
        (["--distill_top_k", "0"], ("ref_distill", 1.0, 0, "sequence_sum")),  # 0: the exact KL
        (["--aligned_loss_weight", "0.3", "--distill_reduction", "token_mean"], ("ref_distill", 0.3, 16, "token_mean")),
        (["--align_loss", "hinge", "--aligned_loss_weight", "0"], ("hinge", 0.0, None, "token_mean")),
    ],
)
def test_settings_left_empty_take_the_forms_own(tiny_model_dir, tmp_path, monkeypatch, flags, expected):
    """ALPHA, DISTILL_TOP_K and DISTILL_REDUCTION left empty are the form's own (forms.FORM_DEFAULTS); a value
    that is set stays."""
    monkeypatch.chdir(tmp_path)
    _, _, train = parse_args(["--model_name_or_path", str(tiny_model_dir), *flags])
    got = (train.align_loss, train.aligned_loss_weight, train.distill_top_k, train.distill_reduction)
    assert got == expected


def test_the_launcher_leaves_the_forms_settings_to_the_form(tiny_model_dir):
    """ALIGN_LOSS=hinge alone is the user guide's form at its own ALPHA: the launcher passes no ALPHA, top-K or
    reduction unless they are set."""
    argv = launcher_command({"DEVICE": "cpu", "ALIGN_LOSS": "hinge"})
    assert not {"--aligned_loss_weight", "--distill_top_k", "--distill_reduction"} & set(argv)
    argv = launcher_command({"DEVICE": "cpu", "ALPHA": "0.2", "DISTILL_TOP_K": "0"})
    assert argv[argv.index("--aligned_loss_weight") + 1] == "0.2"
    assert argv[argv.index("--distill_top_k") + 1] == "0"
