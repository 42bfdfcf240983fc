"""What the user reads: the start summary, the final report, and the messages that used to mislead."""

import logging

import pytest

from preference_dpo import report
from preference_dpo.checkpoints import RUN_CONFIG_NAME, clear_previous_run
from preference_dpo.config import parse_args
from preference_dpo.forms import FORMS


@pytest.fixture(autouse=True)
def _in_empty_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default output folders are relative: keep them away from real runs


@pytest.fixture
def model_dir(tiny_model_dir):
    return ["--model_name_or_path", str(tiny_model_dir)]


BEFORE = {
    "step": 0,
    "eval_loss": 0.69,
    "eval_accuracy_base": 0.25,
    "eval_accuracy_guided": 1.0,
    "eval_margin_base": -2.0,
    "eval_margin_guided": 8.0,
    "eval_pref_advantage_ratio": 22026.0,
    "eval_rewards/accuracies": 0.0,
    "eval_rewards/margins": 0.0,  # before training the policy is the reference: every reward is 0
}
AFTER = {
    "eval_loss": 0.2,
    "eval_accuracy_base": 0.9,
    "eval_accuracy_guided": 1.0,
    "eval_margin_base": 3.0,
    "eval_margin_guided": 9.0,
    "eval_pref_advantage_ratio": 403.4,
    "eval_rewards/accuracies": 0.95,
    "eval_rewards/margins": 0.4,
}


def test_first_evaluation_is_the_step_0_eval_entry():
    history = [{"step": 0, "loss": 0.7}, BEFORE, {"step": 10, "eval_loss": 0.3}]
    assert report.first_evaluation(history) is BEFORE
    assert report.first_evaluation([{"step": 10, "eval_loss": 0.3}]) is None  # resumed without one


def test_transfer_is_the_share_of_the_instructions_margin_effect():
    # effect of the instruction before training: 8 - (-2) = 10 nats; un-instructed margin moved by 5: 50%
    line = report.transfer_line(BEFORE, AFTER)
    assert "from -2.00 to 3.00 nats" in line and "was 8.00" in line and "50% of the instruction's effect" in line
    assert "ALPHA=0" in line  # says what it cannot tell apart from DPO
    assert report.transfer_line({}, AFTER) is None


def test_a_falling_logp_chosen_is_flagged_as_over_optimisation():
    before, healthy, collapsed = (
        {"eval_logps/chosen": -2.46},
        {"eval_logps/chosen": -1.45},
        {"eval_logps/chosen": -99.6},
    )
    assert report.overoptimisation_line(before, healthy) is None
    assert report.overoptimisation_line(before, {"eval_logps/chosen": -3.9}) is None  # within 2 nats
    line = report.overoptimisation_line(before, collapsed)
    assert "fell from -2.46 to -99.60 nats" in line and "over-optimised" in line and "LEARNING_RATE" in line


def test_the_report_gives_the_share_of_the_instruction_gap_closed():
    before, after = {"eval_instruction_gap": 0.400}, {"eval_instruction_gap": 0.100}
    line = report.gap_line(before, after)
    assert "went from 0.400 to 0.100 nats per token" in line and "75% of it closed" in line
    assert report.gap_line({}, after) is None and report.gap_line({"eval_instruction_gap": 0.0}, after) is None
    text = report.report("run", {"eval_instruction_gap": 0.1, "eval_loss": 1.0}, [{"step": 0, "eval_loss": 1.0,
                         "eval_instruction_gap": 0.4}], None, {"wall": 1.0}, 3, "out", "tb")  # fmt: skip
    assert "instruction gap (KL per token, nats)" in text and line in text


def train_log(*points):
    return [{"step": step, "loss": 0.7, "logps/chosen": value} for step, value in points]


def test_a_collapse_on_the_training_pairs_is_flagged_without_a_held_out_set(caplog):
    """The SmolLM2 collapse (-20 -> -146) is flagged, by the report and once during training; a fluent run that
    fell 9 nats (-21 -> -30), a fall of 12 nats from -40 (30%) and evaluation entries are not."""
    from types import SimpleNamespace

    collapsed = train_log((11, -20.0), (22, -60.0), (33, -146.0))
    line = report.collapse_line(collapsed)
    assert "fell from -20.0 (at step 11) to -146.0 nats on the training pairs (step 33)" in line
    assert "LEARNING_RATE" in line
    assert report.collapse_line(train_log((11, -21.0), (22, -30.0))) is None
    assert report.collapse_line(train_log((11, -40.0), (22, -52.0))) is None  # 12 nats but 30%
    assert (
        report.collapse_line([{"step": 5, "eval_logps/chosen": -20.0}, {"step": 9, "eval_logps/chosen": -99.0}]) is None
    )
    text = report.report("run", {}, collapsed, None, {"wall": 1.0}, 33, "out", "tb")
    assert line in text  # no held-out metrics: the line is still there

    watch = report.CollapseWatch()
    caplog.set_level(logging.WARNING, logger="preference_dpo.report")
    for entry in collapsed + [{"step": 44, "loss": 0.1, "logps/chosen": -200.0}]:
        state = SimpleNamespace(global_step=entry["step"], is_world_process_zero=True, log_history=[])
        watch.on_log(None, state, None, logs=dict(entry))
    warnings = [r.getMessage() for r in caplog.records if "collapsing" in r.getMessage()]
    assert warnings == ["logp(chosen) fell from -20.0 (at step 11) to -60.0 nats on the training pairs (step 22): "
                        "the model may be collapsing; lower LEARNING_RATE or ALPHA, or train fewer steps."]  # fmt: skip


def test_a_collapse_within_the_first_logging_window_is_measured_from_before_training(caplog):
    """At LEARNING_RATE=1e4 the first training log (a window of 10 steps) already read -104: measured from it, the
    fall to -126 was 'no collapse'. The training pairs' logp(chosen) before training (the reference's, -2.7) is the
    baseline where the run has it, during training and in the report (kept in the trainer's history, so after a
    resume too). Not the held-out pairs': longer training responses would read as a collapse."""
    from types import SimpleNamespace

    logged = train_log((10, -104.0), (20, -126.0))
    assert report.collapse_line(logged) is None  # the first window as the baseline: -104 -> -126
    watch = report.CollapseWatch(before=-2.7)
    caplog.set_level(logging.WARNING, logger="preference_dpo.report")
    state = SimpleNamespace(global_step=10, is_world_process_zero=True, log_history=[])
    watch.on_log(None, state, None, logs=dict(logged[0]))
    assert state.log_history == [{"step": 0, report.TRAIN_BEFORE_KEY: -2.7}]
    warnings = [r.getMessage() for r in caplog.records if "collapsing" in r.getMessage()]
    assert warnings == ["logp(chosen) fell from -2.7 (before training) to -104.0 nats on the training pairs (step 10): "
                        "the model may be collapsing; lower LEARNING_RATE or ALPHA, or train fewer steps."]  # fmt: skip
    assert report.collapse_line(state.log_history + logged).startswith(
        "Watch: logp(chosen) fell from -2.7 (before training) to -126.0 nats on the training pairs (step 20)"
    )
    # long training responses (-98) beside short held-out ones (-2.7): no collapse, their own baseline is -97
    healthy = [{"step": 0, report.TRAIN_BEFORE_KEY: -97.0}, {"step": 0, "eval_loss": 0.7, "eval_logps/chosen": -2.7},
               *train_log((10, -98.3), (20, -97.9))]  # fmt: skip
    assert report.collapse_line(healthy) is None


def test_report_shows_before_and_after_samples_and_costs():
    samples = report.SampleGenerations(
        [report.SamplePrompt("How do I boil an egg?", [1], [2])], tokenizer=None, max_new_tokens=8, tensorboard=None
    )
    samples.history = {0: [("No idea.", "Boil it.")], 40: [("Boil it 9 minutes.", "Boil it.")]}
    text = report.report(
        "demo", AFTER, [BEFORE], samples, {"wall": 61.0, "training": 50.0, "samples": 0.34}, 40, "out/demo", "tb"
    )
    lines = text.splitlines()
    row = next(line for line in lines if line.lstrip().startswith("pair accuracy, without the instruction"))
    assert row.split()[-2:] == ["0.250", "0.900"]
    assert any("step 0, with the instruction:" in line and "Boil it." in line for line in lines)
    assert any("step 0, without the instruction: No idea." in line for line in lines)
    assert any("step 40, without the instruction: Boil it 9 minutes." in line for line in lines)
    assert "Finished 40 steps: wall 61 s, training 50 s, samples 0.3 s." in text  # small costs keep a decimal
    assert "Adapter in out/demo" in text
    assert len(lines) < 30


def test_reward_accuracy_before_training_is_not_shown_as_zero():
    """Before training every DPO reward is 0, so no pair is won: 0.000 would read as a result. Shown as n/a, and only
    when every margin is 0 (no pair won and a mean margin of 0); the reward margin itself is a true 0."""
    text = report.report("demo", AFTER, [BEFORE], None, {"wall": 1.0}, 4, "out", "tb")
    row = next(line for line in text.splitlines() if "reward accuracy (DPO" in line)
    assert row.split()[-2:] == ["n/a", "0.950"]
    assert "all rewards about 0 before training" in text
    margin = next(line for line in text.splitlines() if "reward margin (DPO)" in line)
    assert margin.split()[-2:] == ["0.000", "0.400"]
    other_reference = {**BEFORE, "eval_rewards/margins": -0.1}  # REFERENCE_MODEL_PATH another model: a true 0
    text = report.report("demo", AFTER, [other_reference], None, {"wall": 1.0}, 4, "out", "tb")
    row = next(line for line in text.splitlines() if "reward accuracy (DPO" in line)
    assert row.split()[-2:] == ["0.000", "0.950"] and "n/a" not in text
    # SmolLM2 before training: rewards of float noise (3e-8 nats) won 0.243 of the pairs; n/a as well
    noise = {**BEFORE, "eval_rewards/accuracies": 0.243, "eval_rewards/margins": 3.08e-8, "eval_rewards/chosen": 1e-8}
    text = report.report("demo", AFTER, [noise], None, {"wall": 1.0}, 4, "out", "tb")
    row = next(line for line in text.splitlines() if "reward accuracy (DPO" in line)
    assert row.split()[-2:] == ["n/a", "0.950"]


def test_transfer_above_the_instructions_effect_and_a_grown_gap_are_said_as_such():
    """A collapsed run (LEARNING_RATE=1e4) read 'Transfer: 1956%' and '-6383% of it closed'."""
    before = {"eval_margin_base": 2.0, "eval_margin_guided": 3.0, "eval_instruction_gap": 0.115}
    after = {"eval_margin_base": 21.56, "eval_instruction_gap": 7.465}
    transfer = report.transfer_line(before, after)
    assert transfer.endswith(
        "19.6x the instruction's effect, more than the instruction itself does: DPO on these pairs moved this margin "
        "past it, so it says nothing about the instruction (the instruction gap does)."
    )
    assert report.gap_line(before, after).endswith(
        ": it grew 64.9x (the policy without the instruction moved away from the instructed reference)."
    )
    lowering = report.transfer_line({"eval_margin_base": 2.0, "eval_margin_guided": 1.0}, {"eval_margin_base": 3.0})
    assert lowering.endswith(
        "was 1.00: training moved it the other way from the instruction's effect, so it says nothing about the "
        "instruction (the instruction gap does)."
    )
    assert "-100%" not in lowering
    assert report.closed_share(0.1, 0.104) == (
        "it grew 4% (the policy without the instruction moved away from the instructed reference)"
    )


def test_samples_of_the_evaluation_before_training_survive_a_resume():
    """A resumed run's callback holds only its own evaluations; the trainer's history (from the checkpoint) holds
    every one, so the report still compares with step 0."""
    samples = report.SampleGenerations(
        [report.SamplePrompt("How do I boil an egg?", [1], [2])], tokenizer=None, max_new_tokens=8, tensorboard=None
    )
    samples.history, samples.gap_history = {64: [("Boil it 9 minutes.", "Boil it.")]}, {64: 0.009}
    history = [
        {"step": 0, report.SAMPLES_KEY: [["No idea.", "Boil it."]], "eval_instruction_gap_generated": 0.115},
        {"step": 64, report.SAMPLES_KEY: [["Boil it 9 minutes.", "Boil it."]], "eval_instruction_gap_generated": 0.009},
    ]
    text = report.report("demo", {}, history, samples, {"wall": 1.0}, 64, "out", "tb")
    assert "0.115 (step 0) to 0.009 nats per token (step 64): 92% of it closed." in text
    assert "step 0, without the instruction: No idea." in text
    assert "step 64, without the instruction: Boil it 9 minutes." in text


def test_summary_is_short_and_says_where_to_look(model_dir):
    data, model, train = parse_args([*model_dir, "--run_name", "demo", "--max_steps", "7"])
    text = report.summary(data, model, train, n_train=100, n_test=20, num_soft_tokens=0)
    assert len(text.splitlines()) <= 15
    assert "7 steps" in text and "100 train pairs" in text and "20 held-out pairs" in text
    assert "ALPHA 1 x ref_distill (top-16 teacher, sequence_sum)" in text and "BETA 0.05" in text
    assert "tensorboard --logdir logs" in text and "#custom_scalars" in text
    assert "20 held-out pairs, before training, every" in text
    train.eval_on_start = False  # a resumed run: its evaluation before training is in the checkpoint's history
    text = report.summary(data, model, train, n_train=100, n_test=20, num_soft_tokens=0)
    assert "20 held-out pairs, every" in text and "before training" not in text


def test_tensorboard_command_names_the_run_after_run_name():
    class Args:
        run_name, log_dir = "demo", "./logs/demo"

    assert report.tensorboard_command(Args) == "tensorboard --logdir logs"  # the run is listed as "demo"
    Args.log_dir = "/tmp/elsewhere"
    assert report.tensorboard_command(Args) == "tensorboard --logdir_spec demo:/tmp/elsewhere"


def test_optimizer_steps_count_as_transformers_does(model_dir):
    _, _, train = parse_args([*model_dir, "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "3"])
    assert report.optimizer_steps(1280, train) == 54  # 160 batches -> 53 full accumulations + 1 partial
    _, _, train = parse_args([*model_dir, "--max_steps", "5"])
    assert report.optimizer_steps(1280, train) == 5


@pytest.mark.parametrize(
    ("form", "alpha", "said", "not_said"),
    [
        ("hinge", "0.8", "never saturates", "KL"),
        ("distill", "6", "KL term", "hinge"),  # each form's ALPHA on its own scale: warned from 5x its default
        ("ref_hinge", "0.8", "reference's", "saturates"),
    ],
)
def test_large_alpha_warning_describes_the_form_in_use(model_dir, caplog, form, alpha, said, not_said):
    with caplog.at_level(logging.WARNING):
        parse_args([*model_dir, "--align_loss", form, "--aligned_loss_weight", alpha])
    warning = next(r.getMessage() for r in caplog.records if "ALPHA" in r.getMessage())
    assert said in warning and not_said not in warning and "docs/method.md" in warning


def test_the_default_alpha_of_each_form_is_not_warned_about(model_dir, caplog):
    with caplog.at_level(logging.WARNING):
        for form in FORMS:
            parse_args([*model_dir, "--align_loss", form])
    assert not [r for r in caplog.records if "ALPHA" in r.getMessage()]


def test_overwrite_warns_only_when_it_replaces_something(tmp_path, caplog):
    empty = tmp_path / "empty"
    empty.mkdir()
    with caplog.at_level(logging.WARNING):
        clear_previous_run(str(empty))
        clear_previous_run(str(tmp_path / "missing"))
    assert "OVERWRITE" not in caplog.text
    finished = tmp_path / "finished"
    (finished / "checkpoint-4").mkdir(parents=True)
    (finished / RUN_CONFIG_NAME).write_text("{}")
    with caplog.at_level(logging.WARNING):
        clear_previous_run(str(finished))
    assert "replacing the previous run" in caplog.text and "a finished run and 1 checkpoint(s)" in caplog.text
    assert not (finished / RUN_CONFIG_NAME).exists()


def test_num_sample_prompts_is_bounded(model_dir):
    from preference_dpo.errors import UserInputError

    with pytest.raises(UserInputError, match=r"NUM_SAMPLE_PROMPTS \(--num_sample_prompts\) must be between 0 and 32"):
        parse_args([*model_dir, "--num_sample_prompts", "33"])


@pytest.mark.parametrize("ours", [False, True])
def test_an_evaluation_during_training_counts_on_the_training_bar(capsys, ours):
    """transformers draws the evaluation's bar below the training bar by moving the cursor (ESC[A), which leaves a
    blank line and an `[A` fragment per refresh in a log file or pipe; ours counts it on the training bar."""
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState
    from transformers.trainer_callback import CallbackHandler, ProgressCallback

    handler = CallbackHandler([ProgressCallback], None, None, None, None)
    if ours:
        report.use_one_progress_bar(SimpleNamespace(callback_handler=handler))
    (bar,) = handler.callbacks
    assert type(bar) is (report.OneProgressBar if ours else ProgressCallback)
    args, state, control = SimpleNamespace(), TrainerState(max_steps=4), TrainerControl()
    bar.on_train_begin(args, state, control)
    for _ in range(3):
        bar.on_prediction_step(args, state, control, eval_dataloader=[1, 2, 3])
    bar.on_evaluate(args, state, control)
    state.global_step = 4
    bar.on_step_end(args, state, control)
    bar.on_train_end(args, state, control)
    err = capsys.readouterr().err
    assert ("\x1b[A" in err) != ours
    assert ("eval 3/3" in err) == ours


def test_each_logging_step_is_one_short_console_line_and_the_whole_dictionary_goes_to_the_log_file(
    capsys, tmp_path, monkeypatch
):
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    train_logs = {"loss": 2.8104, "grad_norm": 4.29, "learning_rate": 0.00048251, "dpo_loss": 0.68976,
                  "aligned_loss": 2.1201, "rewards/accuracies": 0.7875, "logps/chosen": -2.3222,
                  "logits/chosen": -2.437, "mean_token_accuracy": 0.9365, "epoch": 0.15625}  # fmt: skip
    eval_logs = {"eval_loss": 0.9018, "eval_accuracy_base": 0.789, "eval_accuracy_guided": 1.0,
                 "eval_margin_base": 2.239, "eval_margin_guided": 12.18, "eval_logps/chosen": -2.764,
                 "eval_instruction_gap": 0.117, "eval_runtime": 2.38}  # fmt: skip
    assert report.log_line(train_logs, 10, 64) == (
        "step 10/64  loss 2.81  dpo 0.69  aligned 2.12  acc 0.787  logp(chosen) -2.32  lr 0.000483"
    )
    assert report.log_line(eval_logs, 50, 64) == (
        "eval at step 50/64  loss 0.902  acc without/with 0.789/1  margin without/with 2.24/12.2  "
        "logp(chosen) -2.76  instruction gap 0.117"
    )
    assert report.log_line({"loss": 0.7}, 1, 2) == "step 1/2  loss 0.7"  # ALPHA 0: no aligned term to show
    assert report.log_line({"train_runtime": 16.7, "train_loss": 1.53}, 64, 64) is None

    monkeypatch.setattr(report.details, "handlers", [])
    report.attach_log_file(str(tmp_path / "run.log"), is_main_process=True)
    bar = report.OneProgressBar()
    args, state, control = SimpleNamespace(), TrainerState(max_steps=64), TrainerControl()
    bar.on_train_begin(args, state, control)
    state.global_step = 10
    bar.on_log(args, state, control, logs=train_logs)
    bar.on_train_end(args, state, control)
    for handler in report.details.handlers:
        handler.flush()
    console = capsys.readouterr()
    assert "step 10/64  loss 2.81" in console.out + console.err
    assert "mean_token_accuracy" not in console.out + console.err
    logged = (tmp_path / "run.log").read_text()
    assert "'mean_token_accuracy': 0.9365" in logged and "'logits/chosen': -2.437" in logged
