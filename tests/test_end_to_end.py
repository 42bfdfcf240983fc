"""The real launcher, end to end, on the tiny model: files written, tags logged, adapter usable."""

import json
import math
import os
import re
import subprocess

import pytest
import torch

from preference_dpo.metrics import logged_tags

from .conftest import REPO

EXPECTED_OUTPUTS = {
    "adapter_config.json",
    "adapter_model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "config.json",
    "training_args.bin",
    "trainer_state.json",
    "run_config.json",
}


def run_launcher(tmp_path, model_dir, data, expect_returncode=0, **env):
    """The real launcher on the tiny model, 4 steps; asserts its exit status."""
    train, test = data
    out, logs = tmp_path / "out", tmp_path / "logs"
    variables = {
        "DEVICE": "cpu",
        "POLICY_MODEL_PATH": str(model_dir),
        "TRAIN_DATASET_PATH": str(train),
        "TEST_DATASET_PATH": str(test),
        "MAX_STEPS": "4",
        "PER_DEVICE_BATCH_SIZE": "4",
        "LOGGING_STEPS": "1",
        "EVAL_STEPS": "2",
        "SAVE_STEPS": "100",
        "OUTPUT_DIR": str(out),
        "LOG_DIR": str(logs),
        "CACHE_DIR": str(tmp_path / "cache"),  # not the repository's own cache
        "ALPHA": "0.1",
        "ALIGN_LOSS": "hinge",  # the form these runs were written against
        **env,
    }
    result = subprocess.run(
        ["bash", str(REPO / "fast_train.sh")],
        env={**os.environ, **variables},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == expect_returncode, result.stdout[-3000:] + result.stderr[-3000:]
    return out, logs, result


def scalars(log_dir) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [f for f in os.listdir(log_dir) if f.startswith("events.out.tfevents")]
    assert len(events) == 1  # directly in LOG_DIR, one per run
    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return {tag: [e.value for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, tiny_model_dir, small_data):
    tmp = tmp_path_factory.mktemp("e2e_text")
    return run_launcher(tmp, tiny_model_dir, small_data, MERGE_ADAPTER="true")


def test_outputs_match_the_user_guide_layout(text_run):
    out, logs, result = text_run
    assert EXPECTED_OUTPUTS <= set(os.listdir(out))
    assert not {".tokenized", ".final_outputs_incomplete"} & set(os.listdir(out))  # no staging or cache left
    assert "no GPU in use: training on CPU" in result.stderr
    run_logs = list((logs / "runs").iterdir())
    log = run_logs[0].read_text()
    assert len(run_logs) == 1 and "Finished 4 steps" in log
    assert re.search(r"Training: wall \d+ s, 4 steps, [\d.]+ samples/s \(pairs\), \d+ tokens/s", log)
    config = json.loads((out / "run_config.json").read_text())
    assert config["training"]["aligned_loss_weight"] == 0.1
    assert config["versions"]["trl"] == "1.16.0"
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4


def test_every_method_tag_is_logged_with_finite_values(text_run):
    _, logs, _ = text_run
    values = scalars(logs)
    expected, not_written = logged_tags("hinge")  # this run uses ALIGN_LOSS=hinge
    assert not not_written & set(values)
    assert expected <= set(values), sorted(expected - set(values))
    for tag in expected:
        assert all(math.isfinite(v) for v in values[tag]), tag
    assert len(values["loss/train"]) == 4  # LOGGING_STEPS=1
    assert values["loss_components/hinge_loss"] == values["loss_components/aligned_loss"]
    assert len(values["rewards_eval/accuracy"]) >= 2  # at step 2, step 4 and the final evaluation
    assert {"train/learning_rate", "train/grad_norm", "eval/entropy"} <= set(values)  # TRL's own metrics too
    assert all(v > 0 for v in values["train/tokens_per_second"] + values["train/samples_per_second"])
    for a, b, c in zip(
        values["loss/train"], values["loss_components/dpo_loss"], values["loss_components/aligned_loss"], strict=True
    ):
        assert a == pytest.approx(b + 0.1 * c, rel=1e-4)  # loss = dpo_loss + ALPHA * aligned_loss


def test_adapter_loads_and_generates_and_merged_model_matches(text_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _, _ = text_run
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    model.eval()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "How do I boil an egg?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    assert isinstance(tokenizer.decode(generated[0], skip_special_tokens=True), str)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged(**prompt).logits, model(**prompt).logits, rtol=1e-4, atol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        assert not torch.allclose(base(**prompt).logits, model(**prompt).logits)  # the adapter does something


def test_embedding_mode_end_to_end(tmp_path, tiny_model_dir, small_data):
    embedding = tmp_path / "prompt_embeddings.pt"
    torch.save({"prompt_embeddings": torch.randn(4, 64) * 0.05}, embedding)
    out, logs, _ = run_launcher(
        tmp_path,
        tiny_model_dir,
        small_data,
        TRAINING_MODE="embedding",
        PROMPT_EMBEDDING_PATH=str(embedding),
        MAX_STEPS="2",
        EVAL_STEPS="2",
        ALPHA="0.5",
    )
    values = scalars(logs)
    assert all(math.isfinite(v) for v in values["preference_metrics_eval/pref_advantage_ratio"])
    assert values["preference_metrics/pref_advantage_ratio"][0] != pytest.approx(1.0)  # soft tokens shift log-probs
    config = json.loads((out / "run_config.json").read_text())
    assert config["training"]["training_mode"] == "embedding"


def test_bad_input_is_one_line_exit_2_before_loading_weights(tmp_path, tiny_model_dir, small_data):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "P", "chosen": "a", "rejected": "b"}\n{"prompt": "P", "chosen": "a"}\n')
    _, _, result = run_launcher(tmp_path, tiny_model_dir, (bad, small_data[1]), expect_returncode=2)
    errors = [line for line in result.stdout.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {bad} line 2: missing field 'rejected'; every pair needs 'chosen' and 'rejected'."]
    assert "Traceback" not in result.stdout + result.stderr
    assert "Loading weights" not in result.stdout + result.stderr


def test_console_is_a_summary_and_a_report_the_settings_go_to_the_log_file(text_run):
    out, logs, result = text_run
    console = result.stdout + result.stderr
    log = next((logs / "runs").iterdir()).read_text()
    assert '"adam_beta1"' not in console and '"adam_beta1"' in log  # every TrainingArguments field: log file only
    assert "Preference-guided DPO, run Preference_Guided_DPO" in console  # the summary
    assert "Report for run Preference_Guided_DPO" in console
    report = console[console.index("Report for run") :]
    assert re.search(r"pair accuracy, without the instruction +[\d.]+ +[\d.]+", report)  # before and after
    assert "step 0, with the instruction:" in report and "step 4, without the instruction:" in report
    assert "Sample at step 0:" in log and "Sample at step 0:" not in console  # every sample: log file only
    lines = [line for line in re.split(r"[\r\n]", console) if line.strip() and not re.search(r"\d+/\d+ \[", line)]
    assert len(lines) < 100, "\n".join(lines)


def test_tensorboard_first_page_and_sample_text(text_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    _, logs, _ = text_run
    accumulator = EventAccumulator(str(logs), size_guidance={"tensors": 0})
    accumulator.Reload()
    tensors = accumulator.Tags()["tensors"]
    assert metadata.CONFIG_SUMMARY_TAG in tensors
    layout = layout_pb2.Layout()
    layout.ParseFromString(accumulator.Tensors(metadata.CONFIG_SUMMARY_TAG)[0].tensor_proto.string_val[0])
    titles = [chart.title for category in layout.category for chart in category.chart]
    assert titles[0] == "loss (train, eval)" and "pref_advantage_ratio (train, eval)" in titles
    logged = set(accumulator.Tags()["scalars"])
    for category in layout.category:  # every chart shows something in this run (ALPHA > 0, a test set)
        for chart in category.chart:
            patterns = chart.multiline.tag
            assert any(re.search(p, tag) for p in patterns for tag in logged), chart.title
    samples = accumulator.Tensors("samples/greedy/text_summary")  # add_text appends /text_summary
    assert [event.step for event in samples] == [0, 2, 4]  # before training, then every evaluation (once at step 4)
    assert b"| prompt | without the instruction | with the instruction |" in samples[0].tensor_proto.string_val[0]


def test_rerun_with_another_alpha_reuses_tokens_and_reference_pass(tmp_path, tiny_model_dir, small_data, text_run):
    first_out, _, _ = text_run
    _, logs, result = run_launcher(
        tmp_path, tiny_model_dir, small_data, MAX_STEPS="2", ALPHA="0.3", CACHE_DIR=str(first_out.parent / "cache")
    )
    log = next((logs / "runs").iterdir()).read_text()
    assert "Reused the tokenized train pairs (48) from the cache" in log
    assert "Reused the reference log-probs of the train pairs from the cache: no reference pass" in log
    assert "Reused the reference log-probs of the eval pairs from the cache: no reference pass" in log
    assert "Computing reference log probs" not in log  # TRL's progress bar of the reference pass


def test_no_cache_recomputes_and_keeps_nothing(tmp_path, tiny_model_dir, small_data):
    out, logs, _ = run_launcher(tmp_path, tiny_model_dir, small_data, MAX_STEPS="1", CACHE="false")
    log = next((logs / "runs").iterdir()).read_text()
    assert "Computing the reference log-probs of the train pairs" in log and "Reused" not in log
    assert not (tmp_path / "cache").exists() and not (out / ".tokenized").exists()


def test_the_context_form_through_the_launcher_and_its_rerun(tmp_path, tiny_model_dir, small_data):
    """ALIGN_LOSS=context_distill through fast_train.sh: every tag of the form is written (none of the other
    forms'), and a rerun with another seed reuses the reference's answers of both splits instead of generating."""
    settings = {"ALIGN_LOSS": "context_distill", "ALPHA": "1", "MAX_STEPS": "2"}
    out, logs, result = run_launcher(tmp_path, tiny_model_dir, small_data, **settings)
    values = scalars(logs)
    expected, not_written = logged_tags("context_distill")
    assert expected <= set(values), sorted(expected - set(values))
    assert not not_written & set(values)
    assert all(v > 0 for v in values["loss_components/context_distill_loss"])
    first = result.stdout + result.stderr
    assert "Computed the reference's instructed answers to 48 train prompts" in first
    rerun = tmp_path / "rerun"
    rerun.mkdir()
    (rerun / "cache").symlink_to(tmp_path / "cache")
    _, _, again = run_launcher(rerun, tiny_model_dir, small_data, SEED="7", **settings)
    output = again.stdout + again.stderr
    assert "Computed the reference's instructed answers" not in output
    for split in ("train", "eval"):
        assert f"Reused the reference's instructed answers to the {split} prompts from the cache" in output


def test_the_on_policy_form_through_the_launcher(tmp_path, tiny_model_dir, small_data):
    """ALIGN_LOSS=onpolicy_distill DISTILL_ON_POLICY_FRAC=0.5 through fast_train.sh: every tag of the form is
    written (none of the other forms'), half the steps generated, and generation's time is reported."""
    out, logs, result = run_launcher(tmp_path, tiny_model_dir, small_data, ALIGN_LOSS="onpolicy_distill", ALPHA="1",
                                     DISTILL_ON_POLICY_FRAC="0.5")  # fmt: skip
    values = scalars(logs)
    expected, not_written = logged_tags("onpolicy_distill")
    assert expected <= set(values), sorted(expected - set(values))
    assert not not_written & set(values)
    assert values["preference_metrics/onpolicy_frac"] == [0.0, 1.0, 0.0, 1.0]  # steps 0-3 at 0.5, logged every step
    assert all(0 < n <= 64 for n in values["preference_metrics/onpolicy_generated_length"])
    output = result.stdout + result.stderr
    assert "of which on-policy generation" in output
