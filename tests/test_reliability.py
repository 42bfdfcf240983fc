"""Issue 4: bad input fails early and clearly; kills, signals and NaNs lose nothing."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from preference_dpo.checkpoints import COMPLETE_MARKER, RUN_CONFIG_NAME

from .conftest import REPO, write_jsonl

ENTRY = REPO / "train_with_preference_prompt.py"


@pytest.fixture
def common(tiny_model_dir, small_data, tmp_path):
    train, test = small_data
    return [
        "--model_name_or_path", str(tiny_model_dir), "--train_dataset_path", str(train),
        "--test_dataset_path", str(test), "--output_dir", str(tmp_path / "out"), "--log_dir", str(tmp_path / "logs"),
        "--per_device_train_batch_size", "4", "--logging_steps", "1", "--eval_strategy", "no",
        "--cache_dir", str(tmp_path / "cache"),
    ]  # fmt: skip


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if any model weights are loaded."""
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise AssertionError("model weights were loaded before the bad input was reported")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


def run_main(argv, capsys, full_log=False):
    """Exit code and `error:` lines of the entry point (and everything it logged, with full_log)."""
    from train_with_preference_prompt import main

    code = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    return (code, errors, err) if full_log else (code, errors)


def kill_at_step(monkeypatch, trainer_class, step: int = 3):
    """Make `trainer_class` die (SystemExit) as it starts training step `step`, as a SIGKILL would, with no chance to
    save; the original `training_step`, returned, puts it back."""
    original = trainer_class.training_step

    def killed(self, *args, **kwargs):
        if self.state.global_step == step:
            raise SystemExit("simulated SIGKILL: no chance to save")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(trainer_class, "training_step", killed)
    return original


# --- bad input: one line, exit 2, no traceback, before weights load ---------------------------------


def _embedding(tmp_path, tensor):
    path = tmp_path / f"e{len(list(tmp_path.glob('e*.pt')))}.pt"
    torch.save(tensor, path)
    return str(path)


BAD_SETTINGS = [
    (["--training_mode", "foo"], "TRAINING_MODE (--training_mode): invalid choice: 'foo'"),
    (["--beta", "abc"], "BETA (--beta): invalid float value: 'abc'"),
    (["--lora_r", "1.5"], "LORA_R (--lora_r): invalid int value: '1.5'"),
    (["--beta", "-0.1"], "BETA (--beta) must be > 0; got -0.1"),
    (["--max_prompt_length", "400"], "MAX_PROMPT_LENGTH (--max_prompt_length) must be >= 1 and < MAX_LENGTH"),
    (["--no_such_flag", "1"], "unrecognized arguments: --no_such_flag 1"),
]


@pytest.mark.parametrize(("extra", "message"), BAD_SETTINGS)
def test_bad_settings(common, capsys, no_weights, extra, message):
    code, errors = run_main(common + extra, capsys)
    assert code == 2
    assert len(errors) == 1 and message in errors[0], errors


def test_bad_data_and_embedding_files(common, capsys, no_weights, tmp_path):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": "P", "chosen": "a", "rejected": "b"}\n{oops\n')
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    cases = [
        (["--train_dataset_path", str(bad_json)], f"{bad_json} line 2: not valid JSON"),
        (["--train_dataset_path", str(empty_dir)], "folder holds no .jsonl, .json or .parquet file"),
        (["--max_prompt_length", "8"], "All 48 train pairs were dropped"),
        (["--training_mode", "embedding", "--prompt_embedding_path", _embedding(tmp_path, torch.randn(2, 48))],
         "embedding dimension is 48 but the model's hidden size is 64"),
        (["--training_mode", "embedding", "--prompt_embedding_path", _embedding(tmp_path, torch.randn(200, 64))],
         "200 virtual tokens, which leaves no room for a prompt within MAX_PROMPT_LENGTH"),
    ]  # fmt: skip
    for extra, message in cases:
        code, errors = run_main(common + extra, capsys)
        assert code == 2 and len(errors) == 1 and message in errors[0], (extra, errors)


def test_model_that_is_not_a_causal_lm(common, capsys, no_weights, tmp_path):
    from transformers import ViTConfig

    ViTConfig().save_pretrained(tmp_path / "vit")
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    code, errors = run_main([*common, "--model_name_or_path", str(tmp_path / "vit")], capsys)
    assert code == 2 and "model type 'vit' is not a causal language model" in errors[0]
    code, errors = run_main([*common, "--model_name_or_path", str(no_config)], capsys)
    assert code == 2 and "cannot load a model config" in errors[0]


@pytest.mark.parametrize(("flag", "expected"), [([], False), (["--trust_remote_code", "true"], True)])
def test_remote_code_only_on_request(common, capsys, no_weights, monkeypatch, flag, expected):
    from transformers import AutoConfig, AutoTokenizer

    seen = []
    for cls in (AutoConfig, AutoTokenizer):
        real = cls.from_pretrained

        def spy(*args, _real=real, **kwargs):
            seen.append(kwargs.get("trust_remote_code"))
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    code, _ = run_main([*common, "--max_prompt_length", "8", *flag], capsys)  # stops at the data check
    assert code == 2 and len(seen) >= 2 and set(seen) == {expected}


def test_finished_run_is_not_clobbered(common, capsys, no_weights, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / RUN_CONFIG_NAME).write_text("{}")
    (out / "adapter_model.safetensors").write_text("precious")
    code, errors = run_main(common, capsys)
    assert code == 2 and "already holds a finished run" in errors[0] and "OVERWRITE (--overwrite)" in errors[0]
    assert (out / "adapter_model.safetensors").read_text() == "precious"


def test_overwrite_removes_the_replaced_runs_tensorboard_events(common, capsys, tmp_path):
    """OVERWRITE removes the old run's event files with its checkpoints: TensorBoard shows every file of a folder
    as one run, so the old and the new run's points would interleave on every chart. The ptune stage's file
    (the same LOG_DIR) and the launcher's logs stay."""
    from preference_dpo.metrics import PTUNE_EVENTS_SUFFIX

    argv = [*common, "--max_steps", "1", "--save_steps", "1", "--num_sample_prompts", "0"]
    assert run_main(argv, capsys)[0] == 0
    logs = tmp_path / "logs"
    (old,) = [p.name for p in logs.glob("events.out.tfevents.*")]
    kept = [logs / f"events.out.tfevents.1.host.1.0{PTUNE_EVENTS_SUFFIX}", logs / "runs" / "train_1.log"]
    kept[1].parent.mkdir()
    for path in kept:
        path.write_text("kept")
    code, _, log = run_main([*argv, "--overwrite", "true"], capsys, full_log=True)
    assert code == 0
    assert "OVERWRITE: replacing the previous run" in log
    assert f"OVERWRITE: removed the previous run's TensorBoard event file(s) from {logs}: {old}" in log
    assert not (logs / old).exists() and all(path.read_text() == "kept" for path in kept)
    assert len(list(logs.glob("events.out.tfevents.*"))) == 2  # the new run's and the ptune stage's


def test_a_resumed_run_does_not_evaluate_before_training_again(common, capsys, tmp_path, monkeypatch):
    """The evaluation before training runs when a run starts; a resumed run has its result in the history (the
    report's `before` column) and goes straight on training."""
    from preference_dpo.trainer import PreferenceGuidedDPOTrainer

    argv = [*common, "--max_steps", "2", "--save_steps", "1", "--eval_strategy", "steps", "--eval_steps", "1000",
            "--num_sample_prompts", "0"]  # fmt: skip
    assert run_main(argv, capsys)[0] == 0
    out = tmp_path / "out"
    (out / RUN_CONFIG_NAME).unlink()  # as if killed after step 1: unfinished, checkpoint-1 the newest complete one
    shutil.rmtree(out / "checkpoint-2")
    evaluated = []
    original = PreferenceGuidedDPOTrainer.evaluate

    def counting(self, *args, **kwargs):
        evaluated.append(self.state.global_step)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PreferenceGuidedDPOTrainer, "evaluate", counting)
    code, _, log = run_main(argv, capsys, full_log=True)
    assert code == 0 and f"Resuming from {out / 'checkpoint-1'}" in log
    assert evaluated == [2]  # the final evaluation only, none at the resume step
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "eval_loss" in entry] == [0, 2]


@pytest.fixture
def no_system_model_dir(tiny_model_dir, tmp_path):
    """The tiny model with a chat template that refuses a system message (Gemma's rule)."""
    from transformers import AutoTokenizer

    from .test_views import NO_SYSTEM_TEMPLATE

    folder = shutil.copytree(tiny_model_dir, tmp_path / "no_system_model")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = NO_SYSTEM_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


def test_a_template_without_system_role_trains_with_the_user_position(common, capsys, no_system_model_dir, monkeypatch):
    """PREFERENCE_POSITION=user works with such a template (tokenization and the sample prompts); =system is one
    line before any weights load."""
    from transformers import AutoModelForCausalLM

    argv = [*common, "--model_name_or_path", str(no_system_model_dir), "--max_steps", "1", "--num_sample_prompts", "1"]
    code, errors = run_main([*argv, "--preference_position", "user"], capsys)
    assert code == 0, errors

    def refuse(*args, **kwargs):
        raise AssertionError("model weights were loaded before the bad input was reported")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    code, errors = run_main([*argv, "--preference_position", "system", "--overwrite", "true"], capsys)
    assert code == 2 and len(errors) == 1, errors
    assert "does not accept a system message (System role not supported)" in errors[0]
    assert "set PREFERENCE_POSITION=user" in errors[0]


# --- resume -----------------------------------------------------------------------------------------------


def adapter(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.parametrize(
    "form",
    [[], ["--align_loss", "onpolicy_distill", "--aligned_loss_weight", "1", "--on_policy_max_new_tokens", "6"]],
    ids=["hinge", "onpolicy_distill"],
)
def test_killed_run_resumes_and_matches_uninterrupted(common, capsys, tmp_path, monkeypatch, form):
    from preference_dpo.trainer import PreferenceGuidedDPOTrainer

    # LoRA dropout on: every step draws masks, so the random state must match too (and onpolicy_distill samples
    # its answers from it). The uninterrupted run fills the cache (its reference pass iterates a data loader,
    # which draws a seed), the later runs reuse it.
    steps = ["--max_steps", "6", "--save_steps", "2", "--learning_rate", "1e-2", "--lora_dropout", "0.1", *form]
    reference_args = [*common, *steps, "--output_dir", str(tmp_path / "ref"), "--log_dir", str(tmp_path / "ref_logs")]
    assert run_main(reference_args, capsys)[0] == 0
    assert json.loads((tmp_path / "ref" / "adapter_config.json").read_text())["lora_dropout"] == 0.1

    original = kill_at_step(monkeypatch, PreferenceGuidedDPOTrainer)
    with pytest.raises(SystemExit):
        run_main([*common, *steps], capsys)
    out = tmp_path / "out"
    assert (out / "checkpoint-2" / COMPLETE_MARKER).exists() and not (out / RUN_CONFIG_NAME).exists()
    (out / "checkpoint-4").mkdir()  # a checkpoint killed half-written: no completion marker
    (out / "checkpoint-4" / "adapter_model.safetensors").write_text("truncated")

    monkeypatch.setattr(PreferenceGuidedDPOTrainer, "training_step", original)
    code, _, log = run_main([*common, *steps], capsys, full_log=True)  # the same command again
    assert code == 0
    assert "checkpoint-4 was not saved completely" in log
    assert f"Resuming from {out / 'checkpoint-2'}" in log
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 6
    resumed, uninterrupted = adapter(out), adapter(tmp_path / "ref")
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        # CPU, fp32, RNG (so the LoRA dropout masks) and data order restored: equal up to float rounding
        torch.testing.assert_close(resumed[name], uninterrupted[name], rtol=1e-5, atol=1e-6)


def test_resume_refuses_other_settings_and_resume_false_an_earlier_runs_checkpoints(
    common, capsys, tmp_path, monkeypatch
):
    """The optimizer and the learning-rate schedule come back from a checkpoint: a rerun with other settings would
    train on with the old ones while run_config.json recorded the new. And RESUME=false beside an earlier run's
    checkpoints would leave them for a later resume to take. Both refused before weights load; nothing removed."""
    from transformers import AutoModelForCausalLM

    from preference_dpo.trainer import PreferenceGuidedDPOTrainer

    steps = ["--max_steps", "6", "--save_steps", "2", "--learning_rate", "1e-2"]
    kill_at_step(monkeypatch, PreferenceGuidedDPOTrainer)
    with pytest.raises(SystemExit):
        run_main([*common, *steps], capsys)
    checkpoint = tmp_path / "out" / "checkpoint-2"
    saved = json.loads((checkpoint / COMPLETE_MARKER).read_text())
    assert saved["learning_rate"] == 1e-2 and saved["align_loss"] == "ref_distill" and saved["beta"] == 0.05

    def refuse(*args, **kwargs):
        raise AssertionError("model weights were loaded before the bad input was reported")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    code, errors = run_main([*common, *steps, "--learning_rate", "1e-3"], capsys)
    assert code == 2 and errors == [
        f"error: RESUME (--resume_from_checkpoint): {checkpoint} was trained with other settings (LEARNING_RATE "
        "(--learning_rate) 0.01 there, 0.001 now): rerun with the checkpoint's, or start afresh with "
        "OVERWRITE (--overwrite)=true (or another RUN_NAME)."
    ]
    code, errors = run_main([*common, *steps, "--align_loss", "hinge", "--beta", "0.2"], capsys)
    assert code == 2 and len(errors) == 1
    assert (
        "(ALIGN_LOSS (--align_loss) 'ref_distill' there, 'hinge' now; ALPHA (--aligned_loss_weight) 1.0 " in errors[0]
    )
    assert "; BETA (--beta) 0.05 there, 0.2 now" in errors[0]
    code, errors = run_main([*common, *steps, "--lora_r", "8"], capsys)  # a LoRA of another shape
    assert code == 2 and "LORA_R (--lora_r) 16 there, 8 now" in errors[0], errors
    code, errors = run_main([*common, *steps, "--resume_from_checkpoint", "false"], capsys)
    assert code == 2 and errors == [
        f"error: RESUME (--resume_from_checkpoint)=false, but {tmp_path / 'out'} holds 1 checkpoint(s) of an earlier "
        "run, which a later resume would take: set OVERWRITE (--overwrite)=true to replace them, or choose another "
        "OUTPUT_DIR or RUN_NAME."
    ]
    assert (checkpoint / COMPLETE_MARKER).exists()
    # Out of memory: the same global batch in smaller micro-batches, PRECISION spelled out, more steps all resume.
    monkeypatch.undo()
    smaller = [*steps, "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2"]
    code, _, log = run_main([*common, *smaller, "--precision", "fp32", "--max_steps", "7"], capsys, full_log=True)
    assert code == 0 and f"Resuming from {checkpoint}" in log
    assert json.loads((tmp_path / "out" / "trainer_state.json").read_text())["global_step"] == 7


def test_a_checkpoint_marked_before_settings_were_recorded_resumes(common, capsys, tmp_path, monkeypatch):
    from preference_dpo.trainer import PreferenceGuidedDPOTrainer

    steps = ["--max_steps", "4", "--save_steps", "2"]
    kill_at_step(monkeypatch, PreferenceGuidedDPOTrainer)
    with pytest.raises(SystemExit):
        run_main([*common, *steps], capsys)
    monkeypatch.undo()
    (tmp_path / "out" / "checkpoint-2" / COMPLETE_MARKER).write_text("ok\n")  # an earlier version's marker
    code, _, log = run_main([*common, *steps, "--learning_rate", "1e-3"], capsys, full_log=True)
    assert code == 0 and "Resuming from" in log


def test_sigterm_saves_a_checkpoint_and_rerun_finishes(common, tmp_path):
    argv = [sys.executable, str(ENTRY), *common, "--max_steps", "60", "--save_steps", "1000"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    logs = tmp_path / "logs"
    deadline = time.monotonic() + 120
    while not (logs.is_dir() and any(p.name.startswith("events") for p in logs.iterdir())):
        assert proc.poll() is None and time.monotonic() < deadline, "training never logged a step"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "interrupted: Stopped by signal at step" in err
    out = tmp_path / "out"
    saved = [p for p in out.iterdir() if p.name.startswith("checkpoint-")]
    assert len(saved) == 1 and (saved[0] / COMPLETE_MARKER).exists()
    stopped_at = int(saved[0].name.split("-")[1])
    assert 0 < stopped_at < 60 and not (out / RUN_CONFIG_NAME).exists()

    rerun = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"Resuming from {saved[0]}" in rerun.stderr
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 60


# --- NaN / Inf --------------------------------------------------------------------------------------------


def nan_from_call(monkeypatch, n):
    """Make `hinge`'s aligned loss NaN from its n-th training call on (the run must say `--align_loss hinge`)."""
    import preference_dpo.forms.margin as margin

    calls = {"n": 0}
    real = margin.hinge_aligned_loss

    def flaky(target, h_base):
        calls["n"] += 1
        value = real(target, h_base)
        return value * float("nan") if calls["n"] >= n else value

    monkeypatch.setattr(margin, "hinge_aligned_loss", flaky)


def test_nan_loss_stops_naming_step_and_components(common, capsys, monkeypatch, tmp_path):
    nan_from_call(monkeypatch, 3)
    code, errors = run_main([*common, "--align_loss", "hinge", "--max_steps", "5", "--save_steps", "1"], capsys)
    assert code == 3
    assert len(errors) == 1
    assert "Step 3: the training loss is nan (dpo_loss=" in errors[0]
    assert "aligned_loss=nan, ALPHA=0.1" in errors[0]
    assert f"the last good checkpoint is {tmp_path / 'out' / 'checkpoint-2'}" in errors[0]
    assert (tmp_path / "out" / "checkpoint-2" / COMPLETE_MARKER).exists()
    assert not (tmp_path / "out" / "checkpoint-3").exists()


def test_nan_batches_can_be_skipped_and_are_counted(common, capsys, monkeypatch, tmp_path):
    nan_from_call(monkeypatch, 4)
    code, _ = run_main(
        [*common, "--align_loss", "hinge", "--max_steps", "5", "--skip_nonfinite_batches", "true"], capsys
    )
    assert code == 0
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    counts = [h["nonfinite_batches_skipped"] for h in history if "nonfinite_batches_skipped" in h]
    assert counts == [1.0, 2.0]  # steps 4 and 5
    weights = adapter(tmp_path / "out")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_signal_callback_requests_save_and_stop():
    from transformers import TrainerControl, TrainerState

    from preference_dpo.faults import StopOnSignal

    args, state = TrainingArgsStub(), TrainerState(global_step=2)
    stopper = StopOnSignal(signals=(signal.SIGUSR1,))
    try:
        control = stopper.on_step_end(args, state, TrainerControl())
        assert not control.should_save and not control.should_training_stop
        os.kill(os.getpid(), signal.SIGUSR1)
        control = stopper.on_step_end(args, state, TrainerControl())
        assert control.should_save and control.should_training_stop and stopper.stop_signal == signal.SIGUSR1
    finally:
        stopper.restore()


class TrainingArgsStub:
    device = torch.device("cpu")


def test_copies_of_a_signal_are_one_request():
    """A launcher that passes a signal on delivers it again (DeepSpeed's sends SIGTERM to every rank, after the
    terminal's SIGINT reached them): copies are one request. Only a lone process stops at once, and only on a
    signal that comes later than `second_signal_after_s`; ranks started by a launcher never do (the launcher
    kills them: DeepSpeed's after 30 s, fast_train.sh on a second signal)."""
    from preference_dpo.faults import StopOnSignal

    for launched in (False, True):
        stopper = StopOnSignal(signals=(signal.SIGUSR1, signal.SIGUSR2), launched=launched, second_signal_after_s=1.0)
        try:
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGUSR2)  # a copy, right after
            assert stopper.received == signal.SIGUSR1
            time.sleep(1.1)
            if launched:
                os.kill(os.getpid(), signal.SIGUSR1)  # still a copy: ignored
            else:
                with pytest.raises(KeyboardInterrupt):
                    os.kill(os.getpid(), signal.SIGUSR1)
        finally:
            stopper.restore()


def test_a_signal_stops_at_the_next_micro_batch(common, capsys, monkeypatch, tmp_path):
    """GRADIENT_ACCUM_STEPS=4: SIGTERM during micro-batch 2 of step 2 stops after that micro-batch, not after the
    step's 4th (with the presets' 512 micro-batches a step can outlast DeepSpeed's 30 s grace), and saves the last
    finished step; the rerun resumes there and finishes."""
    from preference_dpo.trainer import PreferenceGuidedDPOTrainer

    calls = []
    original = PreferenceGuidedDPOTrainer.training_step

    def signalled_in_step_2(self, *args, **kwargs):
        calls.append(self.state.global_step)
        if len(calls) == 6:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PreferenceGuidedDPOTrainer, "training_step", signalled_in_step_2)
    argv = [*common, "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "4", "--max_steps", "2",
            "--save_steps", "1000"]  # fmt: skip
    code, _, log = run_main(argv, capsys, full_log=True)
    assert code == 128 + signal.SIGTERM
    assert calls == [0, 0, 0, 0, 1, 1]  # step 1's four micro-batches, then two of step 2
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-1"]
    assert (out / "checkpoint-1" / COMPLETE_MARKER).exists()
    # no signal name: through fast_train.sh a Ctrl-C arrives as SIGTERM, and the launcher's own line names what it got
    assert f"interrupted: Stopped by signal at step 1; checkpoint-1 in {tmp_path / 'out'} is complete." in log

    monkeypatch.setattr(PreferenceGuidedDPOTrainer, "training_step", original)
    code, _, log = run_main(argv, capsys, full_log=True)
    assert code == 0 and f"Resuming from {out / 'checkpoint-1'}" in log
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2


def test_a_signal_during_the_final_evaluation_finishes_the_run(common, capsys, tmp_path, monkeypatch):
    """The last step's evaluation runs inside training, where the stop handler still records the signal: no step
    is left to stop at, so the run writes its outputs and exits 0 (as the README says)."""
    from preference_dpo.trainer import PreferenceGuidedDPOTrainer

    original = PreferenceGuidedDPOTrainer.evaluate

    def signalled(self, *args, **kwargs):
        if self.state.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PreferenceGuidedDPOTrainer, "evaluate", signalled)
    argv = [*common, "--max_steps", "2", "--eval_strategy", "steps", "--eval_steps", "1000",
            "--num_sample_prompts", "0"]  # fmt: skip
    code, _, log = run_main(argv, capsys, full_log=True)
    assert code == 0 and "The signal came after the last training step: finishing the run" in log
    assert (tmp_path / "out" / RUN_CONFIG_NAME).is_file()


def test_data_file_untouched_by_failed_run(common, capsys, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "P", "chosen": "a"}])
    before = data.read_bytes()
    code, _ = run_main([*common, "--train_dataset_path", str(data)], capsys)
    assert code == 2 and data.read_bytes() == before


def test_ctrl_c_on_the_launcher_saves_a_checkpoint_and_keeps_the_log(tiny_model_dir, small_data, tmp_path):
    """SIGINT to the launcher's whole process group (as Ctrl-C does): the trainer still saves, and `tee`,
    which ignores the signal, still writes the log file."""
    train, test = small_data
    env = {
        **os.environ, "DEVICE": "cpu", "POLICY_MODEL_PATH": str(tiny_model_dir), "TRAIN_DATASET_PATH": str(train),
        "TEST_DATASET_PATH": str(test), "MAX_STEPS": "60", "PER_DEVICE_BATCH_SIZE": "4", "LOGGING_STEPS": "1",
        "EVAL_STEPS": "1000", "SAVE_STEPS": "1000", "OUTPUT_DIR": str(tmp_path / "out"),
        "LOG_DIR": str(tmp_path / "logs"), "CACHE_DIR": str(tmp_path / "cache"),
    }  # fmt: skip
    proc = subprocess.Popen(["bash", str(REPO / "fast_train.sh")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    logs, deadline = tmp_path / "logs", time.monotonic() + 120
    while not (logs.is_dir() and any(p.name.startswith("events") for p in logs.iterdir())):
        assert proc.poll() is None and time.monotonic() < deadline, "training never logged a step"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, output[-2000:]
    saved = [p for p in (tmp_path / "out").iterdir() if p.name.startswith("checkpoint-")]
    assert len(saved) == 1 and (saved[0] / COMPLETE_MARKER).exists()
    log = next((logs / "runs").iterdir()).read_text()
    assert "interrupted: Stopped by signal at step" in log


# --- the launcher passes signals on: a stand-in trainer records what reaches it ---------------------------------

FAKE_TRAINER = """#!/usr/bin/env python3
import os, signal, sys, time
record, mode = sys.argv[-2], sys.argv[-1]
stop_at = None
def handle(signum, frame):
    global stop_at
    with open(record, "a") as f:
        f.write(signal.Signals(signum).name + "\\n")
    if mode == "saves" and stop_at is None:
        print("stand-in trainer: saving", flush=True)
        stop_at = time.monotonic() + 1.0  # keep listening a while: copies would be recorded too
signal.signal(signal.SIGTERM, handle)
signal.signal(signal.SIGINT, handle)
with open(record, "a") as f:
    f.write(f"ready {os.getpid()}\\n")
while stop_at is None or time.monotonic() < stop_at:
    time.sleep(0.02)
sys.exit(128 + signal.SIGTERM)
"""


def kill_session(session: int) -> None:
    """Every process left in the session a test started (a launcher that failed to stop its job leaves some)."""
    import psutil

    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == session:
                process.kill()
        except (psutil.Error, OSError):
            pass


def stand_in(tmp_path, mode):
    """fast_train.sh's command line and environment with the stand-in as its Python, and the record file."""
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_TRAINER)
    fake.chmod(0o755)
    record = tmp_path / "signals.txt"
    env = {**os.environ, "PYTHON": str(fake), "DEVICE": "cpu", "POLICY_MODEL_PATH": str(tmp_path),
           "LOG_DIR": str(tmp_path / "logs"), "OUTPUT_DIR": str(tmp_path / "out")}  # fmt: skip
    return ["bash", str(REPO / "fast_train.sh"), str(record), mode], env, record


def wait_until_ready(record, alive):
    deadline = time.monotonic() + 30
    while not (record.exists() and record.read_text().startswith("ready")):
        assert alive() and time.monotonic() < deadline, "the stand-in trainer never started"
        time.sleep(0.02)


def launch_stand_in(tmp_path, mode):
    """fast_train.sh with the stand-in as its Python: (launcher process, record file, log folder)."""
    argv, env, record = stand_in(tmp_path, mode)
    proc = subprocess.Popen(argv, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until_ready(record, lambda: proc.poll() is None)
    return proc, record, tmp_path / "logs"


@pytest.mark.parametrize(("to_group", "sig"), [(False, signal.SIGTERM), (True, signal.SIGINT)])
def test_launcher_passes_a_signal_on_once(tmp_path, to_group, sig):
    """SIGTERM to fast_train.sh, or SIGINT to its whole process group (Ctrl-C): the trainer gets exactly one
    SIGTERM, the launcher waits for it to finish saving and exits with 128 + the signal the launcher got."""
    proc, record, logs = launch_stand_in(tmp_path, "saves")
    try:
        os.killpg(proc.pid, sig) if to_group else proc.send_signal(sig)
        assert proc.wait(timeout=30) == 128 + sig
        assert record.read_text().splitlines()[1:] == ["SIGTERM"]
        log = next((logs / "runs").glob("train_*.log")).read_text()
        assert "stand-in trainer: saving" in log
        assert f"fast_train.sh: {signal.Signals(sig).name}: passed on to the training processes as SIGTERM" in log
    finally:
        kill_session(proc.pid)


def test_second_signal_to_the_launcher_kills_the_trainer(tmp_path):
    """A trainer still busy (saving) when a second signal reaches the launcher is killed at once."""
    import psutil

    proc, record, _ = launch_stand_in(tmp_path, "ignores")
    try:
        trainer = int(record.read_text().split()[1])
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert psutil.pid_exists(trainer)  # the first signal leaves the trainer its time
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
        assert record.read_text().splitlines()[1:] == ["SIGTERM"]
        assert not psutil.pid_exists(trainer) or psutil.Process(trainer).status() == psutil.STATUS_ZOMBIE
    finally:
        kill_session(proc.pid)


def test_ctrl_c_in_a_terminal_reaches_the_trainer_once(tmp_path):
    """fast_train.sh in a terminal (a pseudo-terminal here) and Ctrl-C typed into it: one SIGTERM, exit 130."""
    import pty
    import select

    argv, env, record = stand_in(tmp_path, "saves")
    pid, terminal = pty.fork()
    if pid == 0:  # the child: a session of its own, the terminal as its controlling terminal
        os.execve("/bin/bash", argv, env)
    output = b""

    def read_terminal():  # keep the terminal drained, or the launcher blocks on writing to it
        nonlocal output
        while select.select([terminal], [], [], 0.02)[0]:
            try:
                output += os.read(terminal, 4096)
            except OSError:  # the launcher has exited and closed it
                return False
        return True

    status = None
    try:
        wait_until_ready(record, read_terminal)
        os.write(terminal, b"\x03")  # Ctrl-C: the terminal sends SIGINT to its foreground process group
        deadline = time.monotonic() + 30
        while status is None:
            assert time.monotonic() < deadline, output.decode(errors="replace")
            read_terminal()
            done, wait_status = os.waitpid(pid, os.WNOHANG)
            status = os.waitstatus_to_exitcode(wait_status) if done else None
    finally:
        kill_session(pid)
        os.close(terminal)
    assert status == 128 + signal.SIGINT, output.decode(errors="replace")
    assert record.read_text().splitlines()[1:] == ["SIGTERM"]
    assert b"fast_train.sh: SIGINT:" in output


LOG_STAND_IN = """#!/usr/bin/env python3
import os, sys
if sys.argv[1:3] == ["-m", "preference_dpo.tiny_model"]:
    print("stand-in build: pretraining the embedded model", file=sys.stderr)
    sys.exit(0)
print("stand-in trainer: DS_ACCELERATOR=" + os.environ.get("DS_ACCELERATOR", "unset"), file=sys.stderr)
print("error: stand-in trainer: refused", file=sys.stderr)
sys.exit(int(os.environ["STAND_IN_EXIT"]))
"""


@pytest.mark.parametrize(
    ("embedded", "exit_code", "log_kept"),
    [(True, 2, True), (False, 2, False), (False, 1, True)],
    ids=["build_then_refused", "refused", "failed"],
)
def test_launcher_log_holds_the_model_build_and_a_refused_run_leaves_none(tmp_path, embedded, exit_code, log_kept):
    """The embedded model's build is in the run's log file (announced before it starts); a run refused before any
    work (exit 2: bad input, e.g. a finished run without OVERWRITE) leaves no log file of its own. On CPU the
    launcher tells DeepSpeed so (DS_ACCELERATOR), which then does not warn that it found no accelerator."""
    fake = tmp_path / "fake_python"
    fake.write_text(LOG_STAND_IN)
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "DEVICE": "cpu", "LOG_DIR": str(tmp_path / "logs"),
           "OUTPUT_DIR": str(tmp_path / "out"), "STAND_IN_EXIT": str(exit_code)}  # fmt: skip
    env.pop("POLICY_MODEL_PATH", None)
    env.pop("DS_ACCELERATOR", None)
    if not embedded:
        env["POLICY_MODEL_PATH"] = str(tmp_path)
    result = subprocess.run(["bash", str(REPO / "fast_train.sh")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=60)  # fmt: skip
    assert result.returncode == exit_code
    console = result.stdout  # in order
    assert console.index("fast_train.sh: logging to") < console.index("no GPU in use")
    assert "stand-in trainer: DS_ACCELERATOR=cpu" in console  # DeepSpeed told: no "Setting accelerator to CPU"
    if embedded:  # announced before the build, whose output is in the log file
        assert console.index("fast_train.sh: logging to") < console.index("stand-in build")
    logs = list((tmp_path / "logs" / "runs").glob("train_*.log"))
    assert len(logs) == int(log_kept), console
    if log_kept:
        assert "error: stand-in trainer: refused" in logs[0].read_text()
        assert ("stand-in build: pretraining the embedded model" in logs[0].read_text()) == embedded
    else:
        assert "nothing ran" in console
