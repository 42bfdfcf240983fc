"""Issue 10 item 7 and issue 13 item 2: settings that are legal must run, nonsense must stop in one line.

Hub model ids from the offline cache, PRECISION=bf16 (and fp16) on CPU against fp32, LORA_TARGET_MODULES
lists, the skipped-batch count, and `ref_hinge` without TRL's reference precompute under DeepSpeed.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from preference_dpo.config import ModelArguments, PreferenceDPOConfig, parse_args
from preference_dpo.errors import UserInputError

from .conftest import REPO, head_rows, write_jsonl
from .test_reliability import no_weights, run_main  # noqa: F401 (no_weights is a fixture)

P = "Please provide a helpful, honest, harmless and concise answer."


@pytest.fixture
def common(tiny_model_dir, small_data, tmp_path):
    """One step on 8 pairs, no test set: the cheapest real run of the entry point."""
    train = write_jsonl(tmp_path / "train.jsonl", head_rows(small_data[0], 8))
    return [
        "--model_name_or_path", str(tiny_model_dir), "--train_dataset_path", str(train), "--test_dataset_path", "",
        "--output_dir", str(tmp_path / "out"), "--log_dir", str(tmp_path / "logs"), "--cache_dir", str(tmp_path / "cache"),
        "--per_device_train_batch_size", "4", "--logging_steps", "1", "--max_steps", "1",
    ]  # fmt: skip


# --- Hub model ids ----------------------------------------------------------------------------------------


def fake_hub_cache(cache, tiny_model_dir, *repo_ids):
    """A Hugging Face Hub cache holding the tiny model under each repo id, laid out as `hf download` leaves it:
    models--<org>--<name>/refs/main naming a snapshot, snapshots/<revision>/ holding the files."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    for repo_id in repo_ids:
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(revision)
        shutil.copytree(tiny_model_dir, repo / "snapshots" / revision)
    return cache


@pytest.fixture
def hub_cache(tmp_path, tiny_model_dir, monkeypatch):
    """The fake cache, as huggingface_hub and transformers read it in this process (HF_HUB_CACHE is read at import)."""
    from huggingface_hub import constants

    cache = fake_hub_cache(tmp_path / "hub", tiny_model_dir, "tiny-org/tiny-qwen", "tinyqwen")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert constants.HF_HUB_OFFLINE  # conftest: nothing is downloaded
    return cache


def test_hub_ids_in_the_offline_cache_pass_validation_and_missing_ones_are_one_line(hub_cache, tmp_path):
    for repo_id in ("tiny-org/tiny-qwen", "tinyqwen"):  # with and without an organisation, as `gpt2`
        _, model, _ = parse_args(["--model_name_or_path", repo_id, "--reference_model_path", repo_id])
        assert model.model_name_or_path == repo_id
    for repo_id in ("tiny-org/not-downloaded", "gpt2"):
        with pytest.raises(UserInputError) as info:
            parse_args(["--model_name_or_path", repo_id])
        assert len(info.value.problems) == 1 and "\n" not in info.value.problems[0]
        assert info.value.problems[0].startswith(
            f"POLICY_MODEL_PATH (--model_name_or_path): {repo_id!r} is neither a model folder nor a Hub model in "
            f"the local cache ({hub_cache}), and HF_HUB_OFFLINE=1 forbids downloading it"
        )
    # paths that cannot be Hub ids stay "no such folder"
    for path in (str(tmp_path / "missing"), "./missing", "a/b/c"):
        with pytest.raises(UserInputError, match=r"POLICY_MODEL_PATH \(--model_name_or_path\): no such model folder"):
            parse_args(["--model_name_or_path", path])


def test_a_hub_id_from_the_offline_cache_trains(hub_cache, common, capsys, tmp_path):
    argv = list(common)
    argv[argv.index("--model_name_or_path") + 1] = "tiny-org/tiny-qwen"
    code, errors = run_main(argv, capsys)
    assert code == 0, errors
    saved = json.loads((tmp_path / "out" / "run_config.json").read_text())
    assert saved["model"]["model_name_or_path"] == "tiny-org/tiny-qwen"
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["base_model_name_or_path"].endswith(
        "tiny-qwen"
    )


def test_hf_home_points_a_fresh_process_at_its_cache(tmp_path, tiny_model_dir):
    """As a user sets it: HF_HOME in the environment (the cache is $HF_HOME/hub), offline, a bare model name."""
    fake_hub_cache(tmp_path / "home" / "hub", tiny_model_dir, "tinyqwen")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "TRANSFORMERS_CACHE")}
    env.update(HF_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    script = (
        "from preference_dpo.config import parse_args; from preference_dpo.pipeline import check_causal_lm;"
        "_, m, _ = parse_args(['--model_name_or_path', 'tinyqwen', '--output_dir', 'out']);"
        "print(check_causal_lm(m.model_name_or_path, 'model_name_or_path', False).model_type)"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and out.stdout.strip() == "qwen2", out.stderr[-2000:]


MAIN_COMMIT, PINNED_COMMIT = "0123456789abcdef0123456789abcdef01234567", "fedcba9876543210fedcba9876543210fedcba98"


def add_revision(cache, repo_id: str, name: str, commit: str, files_from) -> None:
    """Another revision of `repo_id` in a fake Hub cache: refs/<name> naming snapshot <commit>, a copy of `files_from`."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs" / name).write_text(commit)
    shutil.copytree(files_from, repo / "snapshots" / commit)


def test_model_digest_resolves_the_revision(tmp_path, tiny_model_dir, monkeypatch):
    """Two revisions of one Hub id are two models to the cache keys: each digest names the commit it resolves to."""
    from huggingface_hub import constants

    from preference_dpo.cache import model_digest

    cache = fake_hub_cache(tmp_path / "hub", tiny_model_dir, "tiny-org/tiny-qwen")  # main: MAIN_COMMIT
    add_revision(cache, "tiny-org/tiny-qwen", "v2", PINNED_COMMIT, tiny_model_dir)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert model_digest("tiny-org/tiny-qwen") == f"tiny-org/tiny-qwen@{MAIN_COMMIT}"
    assert model_digest("tiny-org/tiny-qwen", "main") == f"tiny-org/tiny-qwen@{MAIN_COMMIT}"
    assert model_digest("tiny-org/tiny-qwen", "v2") == f"tiny-org/tiny-qwen@{PINNED_COMMIT}"
    assert model_digest("tiny-org/tiny-qwen", PINNED_COMMIT) == f"tiny-org/tiny-qwen@{PINNED_COMMIT}"


@pytest.fixture
def pinned_only_cache(tmp_path, tiny_model_dir, monkeypatch):
    """A Hub cache where `main` holds no model files (only a README) and the tag `v2` holds the tiny model: a load
    of anything that does not pass the revision fails (offline: not in the cache)."""
    from huggingface_hub import constants

    empty = tmp_path / "empty_snapshot"
    empty.mkdir()
    (empty / "README.md").write_text("no model at this revision\n")
    cache = fake_hub_cache(tmp_path / "hub", empty, "tiny-org/tiny-qwen")
    add_revision(cache, "tiny-org/tiny-qwen", "v2", PINNED_COMMIT, tiny_model_dir)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.mark.parametrize("stage", ["ptune", "dpo"])
def test_model_revision_reaches_every_load_of_both_stages(pinned_only_cache, common, capsys, tmp_path, stage):
    """--model_revision v2: the config check, the tokenizer, the weights, PEFT's tokenizer for PTUNE_INIT=text, and
    the cache key all read v2 (any that read `main` would fail). The DPO stage runs with the cache on (its key
    resolves the model's commit), the ptune stage records the revision in its summary."""
    argv = list(common)
    argv[argv.index("--model_name_or_path") + 1] = "tiny-org/tiny-qwen"
    argv += ["--model_revision", "v2", "--stage", stage, "--cache_dir", str(tmp_path / "cache")]
    argv += ["--ptune_max_steps", "1", "--ptune_output_dir", str(tmp_path / "prompt"), "--ptune_init", "text"]
    code, errors = run_main(argv, capsys)
    assert code == 0, errors
    if stage == "ptune":
        summary = json.loads((tmp_path / "prompt" / "prompt_embeddings.json").read_text())
        assert summary["settings"]["model_revision"] == "v2"
    else:
        assert json.loads((tmp_path / "out" / "run_config.json").read_text())["model"]["model_revision"] == "v2"


# --- LORA_TARGET_MODULES ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (["q_proj,v_proj"], ["q_proj", "v_proj"]),
        (["q_proj v_proj"], ["q_proj", "v_proj"]),
        (["q_proj, v_proj"], ["q_proj", "v_proj"]),
        (["q_proj", "v_proj"], ["q_proj", "v_proj"]),
        (["q_proj"], ["q_proj"]),  # a list: PEFT reads a lone string as a regex over the whole module path
        (["all-linear"], "all-linear"),
    ],
)
def test_lora_target_modules_accept_comma_and_space_lists(tiny_model_dir, given, expected):
    _, model, _ = parse_args(["--model_name_or_path", str(tiny_model_dir), "--lora_target_modules", *given])
    assert model.lora_target_modules == expected


def test_listed_lora_targets_reach_peft(common, capsys, tmp_path):
    code, errors = run_main([*common, "--lora_target_modules", "q_proj, v_proj"], capsys)
    assert code == 0, errors
    out = tmp_path / "out"
    assert set(json.loads((out / "adapter_config.json").read_text())["target_modules"]) == {"q_proj", "v_proj"}
    from safetensors.torch import load_file

    layers = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in load_file(out / "adapter_model.safetensors")}
    assert layers == {"q_proj", "v_proj"}


def test_unknown_lora_targets_are_one_line_before_weights_load(common, capsys, no_weights):  # noqa: F811
    code, errors = run_main([*common, "--lora_target_modules", "q_proj,qproj,self_attn"], capsys)
    assert code == 2 and len(errors) == 1, errors
    assert errors[0] == (
        "error: LORA_TARGET_MODULES (--lora_target_modules): no module named 'qproj'; not a layer LoRA can adapt: "
        "'self_attn' (Qwen2Attention) in Qwen2ForCausalLM. Its layers LoRA can adapt: down_proj, embed_tokens, "
        "gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj (or all-linear)."
    )
    code, errors = run_main([*common, "--lora_target_modules", "q_proj,lm_head"], capsys)
    assert code == 2 and len(errors) == 1, errors
    assert "'lm_head' is the LM head, which the log-probs are scored from without LoRA in Qwen2ForCausalLM" in errors[0]
    code, errors = run_main([*common, "--lora_target_modules", "all-linear,q_proj"], capsys)
    assert code == 2 and "LORA_TARGET_MODULES (--lora_target_modules) must be module names" in errors[0]


# --- PRECISION on CPU -------------------------------------------------------------------------------------


def test_bf16_on_cpu_is_accepted_and_trains_on_cpu(tiny_model_dir):
    assert not torch.accelerator.is_available()  # the premise: this machine has no GPU
    _, _, train = parse_args(["--model_name_or_path", str(tiny_model_dir), "--precision", "bf16"])
    assert (train.bf16, train.fp16, train.use_cpu, train.device.type) == (True, False, True, "cpu")
    _, _, train = parse_args(["--model_name_or_path", str(tiny_model_dir), "--precision", "fp16"])
    assert (train.bf16, train.fp16, train.device.type) == (False, True, "cpu")


@pytest.fixture(scope="module")
def sharp_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with its weight matrices scaled x10: logits of std ~1.6 instead of ~0.16, so that log-probs
    are far from uniform and half-precision rounding shows in them (at x1 every precision gives ~ -ln(vocab))."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(10)
    folder = tmp_path_factory.mktemp("sharp_model")
    model.save_pretrained(folder)
    return folder


def precision_trainer(model_dir, tokenizer, small_data, tmp_path, precision):
    """Embedding mode (3 soft tokens), ALIGN_LOSS=distill, weights loaded in the precision's dtype as
    `pipeline.run` loads them; 2 steps of SGD at lr 1 (no warm-up) over the same 8 pairs in order."""
    from transformers import AutoModelForCausalLM
    from trl import get_peft_config

    from preference_dpo.collator import PreferenceViewsCollator
    from preference_dpo.data import load_preference_dataset
    from preference_dpo.trainer import PreferenceGuidedDPOTrainer
    from preference_dpo.views import tokenize_preference_dataset

    args = PreferenceDPOConfig(
        output_dir=str(tmp_path / precision), log_dir=str(tmp_path / f"{precision}_logs"), precision=precision,
        aligned_loss_weight=0.5, align_loss="distill", training_mode="embedding", per_device_train_batch_size=4,
        max_steps=2, optim="sgd", learning_rate=1.0, warmup_steps=0, logging_steps=1, eval_strategy="no",
        save_strategy="no", report_to="none", seed=0, dataloader_num_workers=0, skip_nonfinite_batches=True,
        train_sampling_strategy="sequential",
    )  # fmt: skip
    soft = torch.randn(3, 64, generator=torch.Generator().manual_seed(2)) * 0.1
    train = tokenize_preference_dataset(
        load_preference_dataset(small_data[0]).select(range(8)), tokenizer, name="train", preference_text=P,
        preference_position="system", num_soft_tokens=3, max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
    )  # fmt: skip
    return PreferenceGuidedDPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[precision]),
        args=args,
        data_collator=PreferenceViewsCollator(pad_token_id=tokenizer.pad_token_id, num_soft_tokens=3),
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=get_peft_config(ModelArguments(model_name_or_path=str(model_dir), lora_dropout=0.0)),
        prompt_embedding=soft,
    )


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def train_with_a_nan_at_step_2(trainer, monkeypatch):
    """Train; the distill term is NaN at step 2 (the NaN guard skips that batch). Returns the training logs."""
    import preference_dpo.forms.distill as distill

    real, calls = distill.reduce_token_kl, []

    def nan_on_second_call(*args, **kwargs):
        calls.append(1)
        value = real(*args, **kwargs)
        return value * float("nan") if len(calls) == 2 else value

    monkeypatch.setattr(distill, "reduce_token_kl", nan_on_second_call)
    trainer.train()
    monkeypatch.undo()
    return [h for h in trainer.state.log_history if "loss" in h]


@pytest.fixture(scope="module")
def fp32_logs(sharp_model_dir, tokenizer, small_data, tmp_path_factory):
    trainer = precision_trainer(sharp_model_dir, tokenizer, small_data, tmp_path_factory.mktemp("fp32"), "fp32")
    return train_with_a_nan_at_step_2(trainer, pytest.MonkeyPatch())


# Allowed differences from the fp32 run, about 3x those measured here (bf16 keeps 8 significant bits, u = 2^-8
# = 3.9e-3; fp16 11, u = 4.9e-4; fp16 came out 2 to 4x closer than bf16, not 8x):
# - summed response log-probs (~60 tokens, 80 to 400 nats), relative: bf16 2e-3 (measured 4.6e-4), fp16 5e-4 (1e-4);
# - pref_delta_w/l, differences of two such sums (guided - base): bf16 0.6 nats (0.11 on one machine, 0.31 on
#   another CPU of this kind: its bf16 kernels round differently; two sums each within 2e-3 of ~150 nats can
#   differ by 0.6), fp16 0.15 (0.045);
# - dpo_loss, rewards/margins (BETA x differences of sums) and distill_loss (a KL in fp32 from half-precision
#   hidden states): fp16 0.015 (measured 0.003); bf16 0.04 (measured 0.005 on one machine, 0.022 on another CPU
#   of this kind after one SGD step: BETA x the 0.6-nat tolerance of a difference of sums is 0.03).
# SGD, so that step 2 carries step 1's half-precision gradient in proportion (Adam's first step is nearly
# lr x sign(gradient): one flipped sign moves a weight by 2 lr, whatever the precision).
TOLERANCES = {
    "bf16": {"logps": 2e-3, "delta": 0.6, "loss": 0.04},
    "fp16": {"logps": 5e-4, "delta": 0.15, "loss": 0.015},
}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_on_cpu_matches_fp32(precision, fp32_logs, sharp_model_dir, tokenizer, small_data, tmp_path,
                                             monkeypatch):  # fmt: skip
    """The half-precision code path on CPU (PRECISION=bf16; fp16 runs too): weights in bf16, autocast, the
    shared-prompt guided view with the soft tokens cast to the model's dtype, the distill loss's chunked
    logits, the NaN guard. Step by step it gives fp32's losses and metrics within the format's tolerance."""
    trainer = precision_trainer(sharp_model_dir, tokenizer, small_data, tmp_path, precision)
    assert trainer.accelerator.mixed_precision == precision and trainer.args.device.type == "cpu"
    assert trainer.model.get_base_model().model.embed_tokens.weight.dtype == DTYPES[precision]
    logs = train_with_a_nan_at_step_2(trainer, monkeypatch)
    assert [h["step"] for h in logs] == [1, 2]
    assert logs[1]["nonfinite_batches_skipped"] == 1.0 and logs[1]["loss"] == 0.0  # the guard skipped step 2
    tol = TOLERANCES[precision]
    for half, full in zip(logs, fp32_logs, strict=True):
        step = half["step"]
        for key in ("logps/chosen", "logps/rejected"):
            assert half[key] == pytest.approx(full[key], rel=tol["logps"]), (step, key)
        for key in ("pref_delta_w", "pref_delta_l"):
            assert half[key] == pytest.approx(full[key], abs=tol["delta"]), (step, key)
        for key in ("dpo_loss", "rewards/margins") + (("distill_loss",) if step == 1 else ()):
            assert half[key] == pytest.approx(full[key], abs=tol["loss"]), (step, key)
    # the comparison has something to compare: the instruction moves log-probs, step 1 moved the policy
    assert logs[0]["distill_loss"] > 0.1 and abs(logs[0]["pref_delta_l"]) > 1
    assert logs[1]["rewards/margins"] > 0.1  # 0 before any step; 0.23 on the embedded data of 512 pairs


# --- the skipped-batch count ----------------------------------------------------------------------------------


def test_skipped_batches_log_their_count_not_a_windowed_mean(common, capsys, monkeypatch, tmp_path):
    """Three skips in one logging window log 3 (before: the mean of the running totals 1, 2, 3 = 2)."""
    from .test_reliability import nan_from_call

    nan_from_call(monkeypatch, 1)  # every training batch is NaN
    argv = [
        *common,
        "--align_loss",
        "hinge",
        "--max_steps",
        "4",
        "--logging_steps",
        "3",
        "--skip_nonfinite_batches",
        "true",
    ]
    code, errors = run_main(argv, capsys)
    assert code == 0, errors
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    counts = [(h["step"], h["nonfinite_batches_skipped"]) for h in history if "nonfinite_batches_skipped" in h]
    assert counts == [(3, 3.0), (4, 4.0)]  # the running total, at every log


# --- ref_hinge without TRL's precompute under DeepSpeed ---------------------------------------------------


def test_ref_hinge_without_reference_precompute_under_zero3(tmp_path, tiny_model_dir, small_data):
    """Before `train` prepares the policy, ZeRO-3 holds its parameters sharded (a forward on them fails); the
    reference's guided margins are computed through DeepSpeed's inference engine with or without TRL's
    reference precompute. One DeepSpeed rank on CPU (sharding happens at any world size), 2 steps."""
    train = write_jsonl(tmp_path / "train.jsonl", head_rows(small_data[0], 8))
    test = write_jsonl(tmp_path / "test.jsonl", head_rows(small_data[1], 4))
    out = tmp_path / "out"
    argv = [
        "deepspeed", "--num_gpus=1", "--master_port=29563", str(REPO / "train_with_preference_prompt.py"),
        "--deepspeed", str(REPO / "ds_config_zero3.json"), "--model_name_or_path", str(tiny_model_dir),
        "--train_dataset_path", str(train), "--test_dataset_path", str(test), "--output_dir", str(out),
        "--log_dir", str(tmp_path / "logs"), "--cache_dir", str(tmp_path / "cache"), "--align_loss", "ref_hinge",
        "--aligned_loss_weight", "0.5",
        "--precompute_ref_log_probs", "false", "--per_device_train_batch_size", "4", "--max_steps", "2",
        "--logging_steps", "1", "--eval_steps", "2",
    ]  # fmt: skip
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions")}  # as fast_train.sh
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    train_logs = [h for h in history if "loss" in h]
    assert len(train_logs) == 2 and all(h["ref_hinge_loss"] >= 0 for h in train_logs)
    assert any("eval_ref_hinge_loss" in h for h in history)
