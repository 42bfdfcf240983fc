"""The stage that learns the soft prompt (STAGE=ptune): objective, placement, file format, launcher, faults."""

import json
import logging
import math
import os
import shlex
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from preference_dpo.collator import PreferenceViewsCollator
from preference_dpo.losses import preference_accuracy_and_margin, prompt_dpo_loss, prompt_sft_loss
from preference_dpo.metrics import PTUNE_METRIC_TAGS
from preference_dpo.ptune import EMBEDDING_FILE, SAFETENSORS_FILE, SUMMARY_FILE, SoftPromptModel, build_prompt_encoder
from preference_dpo.views import tokenize_views

from .conftest import REPO
from .test_end_to_end import run_launcher
from .test_reliability import common, kill_at_step, no_weights, run_main  # noqa: F401 (fixtures)

TEXT = "Please provide a helpful, honest, harmless and concise answer."
PAIRS = [
    {
        "prompt": [{"role": "user", "content": "How do I boil an egg?"}],
        "chosen": [{"role": "assistant", "content": "Boil it for nine minutes."}],
        "rejected": [{"role": "assistant", "content": "I cannot help with that."}],
    },
    {
        "prompt": [{"role": "user", "content": "Name a country in Europe, please, and say why you like it."}],
        "chosen": [{"role": "assistant", "content": "France."}],
        "rejected": [{"role": "assistant", "content": "As an expert, I guarantee: Spain."}],
    },
]


# --- the objective, by hand -----------------------------------------------------------------------------------


def test_prompt_objectives_hand_computed():
    """Two pairs, beta = 0.5; prompted log-probs (chosen, rejected) = (-1, -3) and (-2, -1), plain (-2, -2), (-1, -1).

    dpo: pair 1: (-1 - -2) - (-3 - -2) = 2, loss log(1 + e^-1) = 0.3132617;
         pair 2: (-2 - -1) - (-1 - -1) = -1, loss log(1 + e^0.5) = 0.9740770; mean 0.6436694.
    sft: chosen lengths 2 and 4: mean(1/2, 2/4) = 0.5.
    prompted view: pair 1 prefers chosen, pair 2 does not: accuracy 0.5; margins 2 and -1: mean 0.5.
    """
    prompted_c, prompted_r = torch.tensor([-1.0, -2.0], requires_grad=True), torch.tensor([-3.0, -1.0])
    plain_c, plain_r = torch.tensor([-2.0, -1.0]), torch.tensor([-2.0, -1.0])
    loss = prompt_dpo_loss(prompted_c, prompted_r, plain_c, plain_r, beta=0.5)
    assert loss.item() == pytest.approx(0.6436694, abs=1e-6)
    loss.backward()
    # d/dc of -log sigmoid(0.5 * m) = -0.5 * sigmoid(-0.5 * m) / 2 pairs
    expected = [-0.25 / (1 + math.exp(1.0)), -0.25 / (1 + math.exp(-0.5))]
    assert prompted_c.grad.tolist() == pytest.approx(expected, abs=1e-6)
    same = prompt_dpo_loss(plain_c, plain_r, plain_c, plain_r, beta=0.5)
    assert same.item() == pytest.approx(math.log(2), abs=1e-6)  # the prompt changes nothing: ln 2
    assert prompt_sft_loss(torch.tensor([-1.0, -2.0]), torch.tensor([2, 4])).item() == pytest.approx(0.5)
    accuracy, margin = preference_accuracy_and_margin(torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0]))
    assert (accuracy.item(), margin.item()) == (0.5, 0.5)


def test_a_learned_prompt_worse_than_no_prompt_is_warned_of(caplog):
    """STAGE=all went on to DPO with a prompt at accuracy 0.703 where no prompt had 0.750, without a word."""
    from preference_dpo.ptune import log_comparison

    comparison = {
        "without_prompt": {"accuracy": 0.75, "margin": 2.1, "pairs": 128},
        "learned_prompt": {"accuracy": 0.703, "margin": 2.5, "pairs": 128},
    }
    caplog.set_level(logging.INFO, logger="preference_dpo.ptune")
    log_comparison(comparison, 16, "text")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(
        "The learned soft prompt scores below no prompt on the held-out pairs (accuracy 0.703 against 0.750): "
    )
    caplog.clear()
    log_comparison({**comparison, "learned_prompt": {"accuracy": 0.8, "margin": 2.5, "pairs": 128}}, 16, "text")
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_the_trainer_and_deepspeed_internals_the_stage_relies_on():
    """`SoftPromptTrainer` overrides these transformers 5.22 `Trainer` methods and calls DeepSpeed's savers with
    `exclude_frozen_parameters`; a version that changes them fails here first (both are pinned)."""
    import inspect

    from deepspeed.runtime.engine import DeepSpeedEngine
    from transformers import Trainer

    expected = {
        "compute_loss": ["self", "model", "inputs", "return_outputs", "num_items_in_batch"],
        "prediction_step": ["self", "model", "inputs", "prediction_loss_only", "ignore_keys"],
        "log": ["self", "logs", "start_time"],
        "save_model": ["self", "output_dir", "_internal_call"],
        "_save": ["self", "output_dir", "state_dict"],
        "_save_checkpoint": ["self", "model", "trial"],
        "_save_optimizer_and_scheduler": ["self", "output_dir"],
        "_set_signature_columns_if_needed": ["self"],
    }
    for name, parameters in expected.items():
        assert list(inspect.signature(getattr(Trainer, name)).parameters) == parameters, name
    assert "exclude_frozen_parameters" in inspect.signature(DeepSpeedEngine.save_checkpoint).parameters
    assert (
        "exclude_frozen_parameters"
        in inspect.signature(DeepSpeedEngine._zero3_consolidated_16bit_state_dict).parameters
    )


# --- the soft prompt: where it goes, what trains, how it starts --------------------------------------------------


def soft_model(tiny_model_dir, prompt_encoder, k):
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.requires_grad_(False)
    add_fused_lm_head(model)
    return SoftPromptModel(model, prompt_encoder, k)


def batch_of_pairs(tokenizer, k):
    examples = [tokenize_views(pair, tokenizer, TEXT, "system", num_soft_tokens=k, max_length=300) for pair in PAIRS]
    return examples, PreferenceViewsCollator(pad_token_id=0, num_soft_tokens=k, guided_forward="full")(examples)


def test_soft_prompt_sits_right_after_the_prompt_and_scores_the_response(tiny_model_dir, tokenizer):
    k = 3
    prompt = torch.randn(k, 64) * 0.1
    model = soft_model(tiny_model_dir, torch.nn.Embedding.from_pretrained(prompt, freeze=False), k)
    examples, batch = batch_of_pairs(tokenizer, k)
    assert len(examples[0]["prompt_ids"]) != len(examples[1]["prompt_ids"])  # right padding differs per row
    with torch.no_grad():
        got = model(
            batch["guided_input_ids"],
            batch["guided_attention_mask"],
            batch["guided_completion_mask"],
            batch["guided_soft_token_mask"],
        )
    # by hand: [prompt embeddings, E, response embeddings], one sequence at a time, the model's own logits
    embed = model.model.get_input_embeddings()
    for row, (example, side) in enumerate([(ex, s) for s in ("chosen_ids", "rejected_ids") for ex in examples]):
        response = torch.tensor(example[side])
        inputs = torch.cat([embed(torch.tensor(example["prompt_ids"])), prompt, embed(response)])[None]
        with torch.no_grad():
            logits = model.model(inputs_embeds=inputs).logits[0]
        start = len(example["prompt_ids"]) + k
        logps = logits[start - 1 : -1].log_softmax(-1).gather(-1, response[:, None]).sum()
        assert got[row].item() == pytest.approx(logps.item(), rel=1e-5, abs=1e-4), row


def test_only_the_prompt_trains_and_it_is_the_whole_state(tiny_model_dir, tokenizer):
    k = 4
    settings = SimpleNamespace(num_virtual_tokens=k, ptune_init="text", ptune_encoder="none", preference_text=TEXT)
    model = soft_model(tiny_model_dir, None, k)
    model.prompt_encoder = build_prompt_encoder(model.model, str(tiny_model_dir), settings)
    frozen = {name: p.detach().clone() for name, p in model.model.named_parameters()}
    before = model.prompt().detach().clone()
    _, batch = batch_of_pairs(tokenizer, k)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    prompted = model(
        batch["guided_input_ids"],
        batch["guided_attention_mask"],
        batch["guided_completion_mask"],
        batch["guided_soft_token_mask"],
    )
    with torch.no_grad():
        plain = model(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    prompt_dpo_loss(*prompted.chunk(2), *plain.chunk(2), beta=0.1).backward()
    optimizer.step()
    assert not torch.equal(model.prompt(), before)
    for name, p in model.model.named_parameters():
        assert p.grad is None and torch.equal(p, frozen[name]), name
    state = model.state_dict()
    assert list(state) == ["prompt_encoder.embedding.weight"]  # checkpoints hold the prompt, not the model
    fresh = soft_model(tiny_model_dir, torch.nn.Embedding(k, 64), k)
    fresh.prompt_encoder = build_prompt_encoder(fresh.model, str(tiny_model_dir), settings)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.prompt(), model.prompt())


def test_initialisation_from_text_vocab_and_through_the_mlp(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    table = model.get_input_embeddings().weight.detach()
    ids = tokenizer(TEXT)["input_ids"]
    assert len(ids) == 12

    def encoder(k, init="text", kind="none"):
        settings = SimpleNamespace(num_virtual_tokens=k, ptune_init=init, ptune_encoder=kind, preference_text=TEXT)
        return build_prompt_encoder(model, str(tiny_model_dir), settings)

    repeated = encoder(16).embedding.weight.detach()
    assert torch.equal(repeated, table[(ids * 2)[:16]])  # repeated to k
    assert torch.equal(encoder(5).embedding.weight.detach(), table[ids[:5]])  # cut to k
    torch.manual_seed(0)
    sampled = encoder(8, init="vocab").embedding.weight.detach()
    assert all(any(torch.equal(row, vocab_row) for vocab_row in table) for row in sampled)  # rows of the vocabulary
    mlp = encoder(16, kind="mlp")
    assert torch.equal(mlp.embedding.weight.detach(), repeated)  # the MLP's input starts at the text tokens
    output = mlp(torch.arange(16))
    assert output.shape == (16, 64) and not torch.equal(output.detach(), repeated)
    assert any(name.startswith("mlp_head.") for name, _ in mlp.named_parameters())


# --- bad input: one line each, exit 2, before weights load -----------------------------------------------------


def test_bad_ptune_settings_are_reported_at_once(common, capsys, no_weights):  # noqa: F811
    argv = [*common, "--stage", "ptune", "--num_virtual_tokens", "0", "--ptune_learning_rate", "0"]
    code, errors = run_main([*argv, "--ptune_epochs", "0"], capsys)
    assert code == 2 and errors == [
        "error: NUM_VIRTUAL_TOKENS (--num_virtual_tokens) must be >= 1; got 0. Typical: 8-32.",
        "error: PTUNE_LEARNING_RATE (--ptune_learning_rate) must be > 0; got 0.0. Typical: 1e-2.",
        "error: PTUNE_EPOCHS (--ptune_epochs) must be > 0 (or set PTUNE_MAX_STEPS (--ptune_max_steps)).",
    ]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--num_virtual_tokens", "128"], "NUM_VIRTUAL_TOKENS (--num_virtual_tokens) = 128 leaves no room for a prompt"),
        (["--preference_text", " ", "--training_mode", "embedding"],
         "PREFERENCE_TEXT (--preference_text) is empty: PTUNE_INIT (--ptune_init)=text starts the prompt from its"),
        (["--stage", "all"], "STAGE (--stage): invalid choice: 'all'"),
        (["--ptune_objective", "kto"], "PTUNE_OBJECTIVE (--ptune_objective): invalid choice: 'kto'"),
        (["--ptune_encoder", "lstm"], "PTUNE_ENCODER (--ptune_encoder): invalid choice: 'lstm'"),
    ],
)  # fmt: skip
def test_bad_ptune_setting(common, capsys, no_weights, extra, message):  # noqa: F811
    code, errors = run_main([*common, "--stage", "ptune", *extra], capsys)
    assert code == 2 and len(errors) == 1 and message in errors[0], errors


def test_the_ptune_stage_ignores_the_dpo_stage_embedding_file_and_output(common, capsys, no_weights, tmp_path):  # noqa: F811
    """STAGE=all hands both stages the file the first one writes: ptune must not require it (nor DPO's folder)."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "run_config.json").write_text("{}")  # a finished DPO run
    ptune_dir = tmp_path / "prompt"
    ptune_dir.mkdir()
    (ptune_dir / SUMMARY_FILE).write_text("{}")  # a finished prompt: this one is refused
    argv = [*common, "--stage", "ptune", "--training_mode", "embedding", "--ptune_output_dir", str(ptune_dir)]
    argv += ["--prompt_embedding_path", str(tmp_path / "not_yet.pt")]
    code, errors = run_main(argv, capsys)
    assert code == 2 and errors == [
        f"error: PTUNE_OUTPUT_DIR (--ptune_output_dir) '{ptune_dir}' already holds a learned prompt ({SUMMARY_FILE}); "
        "set OVERWRITE (--overwrite)=true to replace it, or choose another PTUNE_OUTPUT_DIR."
    ]


def test_overwrite_clears_the_old_prompt_marker_first(tmp_path):
    from preference_dpo.checkpoints import COMPLETE_MARKER
    from preference_dpo.errors import UserInputError
    from preference_dpo.ptune import check_prompt_output_dir, clear_previous_prompt

    for name in (SUMMARY_FILE, EMBEDDING_FILE, SAFETENSORS_FILE, "notes.txt"):
        (tmp_path / name).write_text("old")
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / COMPLETE_MARKER).write_text("ok")
    with pytest.raises(UserInputError, match="already holds a learned prompt"):
        check_prompt_output_dir(str(tmp_path), overwrite=False)
    check_prompt_output_dir(str(tmp_path), overwrite=True)
    clear_previous_prompt(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]  # the stage's own files only
    check_prompt_output_dir(str(tmp_path), overwrite=False)  # nothing left to protect


def test_overwrite_removes_each_stages_own_tensorboard_events(tmp_path, caplog):
    """Both stages log into one LOG_DIR: OVERWRITE of the ptune stage removes its event files, the DPO stage's
    OVERWRITE the DPO stage's, so STAGE=all with OVERWRITE keeps the prompt just learned's curves."""
    import logging

    from preference_dpo.checkpoints import clear_previous_run
    from preference_dpo.metrics import PTUNE_EVENTS_SUFFIX, TensorBoardMetricsCallback
    from preference_dpo.ptune import clear_previous_prompt

    logs = tmp_path / "logs"
    writer = TensorBoardMetricsCallback(str(logs), filename_suffix=PTUNE_EVENTS_SUFFIX)
    writer.add_text("t", "x", 0)  # the ptune stage's writer: its file is told apart by its name
    writer.close()
    (ptune,) = logs.iterdir()
    assert ptune.name.startswith("events.out.tfevents.") and ptune.name.endswith(PTUNE_EVENTS_SUFFIX)
    dpo = logs / "events.out.tfevents.1.host.1.0"
    dpo.write_text("old DPO run")
    with caplog.at_level(logging.WARNING):
        clear_previous_prompt(tmp_path / "prompt", str(logs))
    assert dpo.exists() and not ptune.exists()
    assert f"removed the previous ptune stage's TensorBoard event file(s) from {logs}: {ptune.name}" in caplog.text
    ptune.write_text("the prompt just learned")
    clear_previous_run(str(tmp_path / "out"), str(logs))
    assert ptune.exists() and not dpo.exists()


# --- resume after a kill ------------------------------------------------------------------------------------------


def load_prompt(folder: Path) -> torch.Tensor:
    content = torch.load(folder / EMBEDDING_FILE, weights_only=True)
    assert list(content) == ["prompt_embeddings"]
    return content["prompt_embeddings"]


def test_killed_ptune_stage_resumes_and_matches_uninterrupted(common, capsys, tmp_path, monkeypatch):  # noqa: F811
    from preference_dpo.checkpoints import COMPLETE_MARKER
    from preference_dpo.ptune import SoftPromptTrainer

    steps = ["--stage", "ptune", "--ptune_max_steps", "4", "--save_steps", "2", "--test_dataset_path", ""]
    reference = [*common, *steps, "--ptune_output_dir", str(tmp_path / "ref")]
    assert run_main(reference, capsys)[0] == 0

    original = kill_at_step(monkeypatch, SoftPromptTrainer)
    argv = [*common, *steps, "--ptune_output_dir", str(tmp_path / "prompt")]
    with pytest.raises(SystemExit):
        run_main(argv, capsys)
    out = tmp_path / "prompt"
    assert (out / "checkpoint-2" / COMPLETE_MARKER).exists() and not (out / SUMMARY_FILE).exists()
    assert {p.name for p in (out / "checkpoint-2").iterdir()} >= {"model.safetensors", "optimizer.pt"}
    assert (out / "checkpoint-2" / "model.safetensors").stat().st_size < 10_000  # the prompt, not the model

    monkeypatch.setattr(SoftPromptTrainer, "training_step", original)
    code, _, log = run_main(argv, capsys, full_log=True)  # the same command again
    assert code == 0 and f"Resuming from {out / 'checkpoint-2'}" in log
    assert json.loads((out / SUMMARY_FILE).read_text())["global_step"] == 4
    # CPU, fp32, RNG and data order restored: equal up to float rounding
    torch.testing.assert_close(load_prompt(out), load_prompt(tmp_path / "ref"), rtol=1e-5, atol=1e-6)


# --- the launcher -------------------------------------------------------------------------------------------------


def dry_run(**env) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    result = subprocess.run(
        ["bash", str(REPO / "fast_train.sh")], env={**os.environ, "DRY_RUN": "1", **env}, capture_output=True, text=True
    )
    return result, [shlex.split(line) for line in result.stdout.splitlines()]


def flag(argv: list[str], name: str) -> str:
    return argv[len(argv) - 1 - argv[::-1].index(name) + 1]  # the last occurrence, as argparse reads it


@pytest.mark.parametrize(
    ("env", "prefix", "contains"),
    [
        ({"DEVICE": "cpu"}, ["python3"], []),
        ({"DEVICE": "cpu", "CPU_RANKS": "2"}, ["env"], ["deepspeed", "--num_gpus=2", str(REPO / "ds_config.json")]),
        ({"DEVICE": "gpu", "GPU_NODES": "localhost:1,2"}, ["env", "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"],
         ["deepspeed", "--include=localhost:1,2", str(REPO / "ds_config.json")]),
        ({"DEVICE": "gpu", "ZERO_STAGE": "3", "ALIGN_LOSS": "hinge"}, ["env", "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"],
         ["deepspeed", "--include=localhost:0", str(REPO / "ds_config_zero3.json")]),
    ],
)  # fmt: skip
def test_stage_all_prints_ptune_then_dpo_in_embedding_mode(tmp_path, env, prefix, contains):
    out = tmp_path / "out"
    result, commands = dry_run(STAGE="all", OUTPUT_DIR=str(out), LOG_DIR=str(tmp_path / "logs"), **env)
    assert result.returncode == 0, result.stderr
    assert [argv[-2:] for argv in commands] == [["--stage", "ptune"], ["--stage", "dpo"]]
    ptune, dpo = commands
    assert ptune[:-2] == dpo[:-2]  # the same launcher form and settings; only the stage differs
    assert ptune[: len(prefix)] == prefix and set(contains) <= set(ptune), ptune[:8]
    assert flag(dpo, "--training_mode") == "embedding"
    assert flag(dpo, "--prompt_embedding_path") == str(out / "ptune" / EMBEDDING_FILE)
    assert flag(ptune, "--ptune_output_dir") == str(out / "ptune")


def test_stage_forms_and_errors_of_the_launcher(tmp_path):
    out = tmp_path / "out"
    _, commands = dry_run(DEVICE="cpu", STAGE="ptune", OUTPUT_DIR=str(out))
    assert len(commands) == 1 and commands[0][-2:] == ["--stage", "ptune"]
    assert flag(commands[0], "--training_mode") == "text"  # STAGE=ptune changes no DPO setting
    _, commands = dry_run(DEVICE="cpu", OUTPUT_DIR=str(out))
    assert len(commands) == 1 and commands[0][-2:] == ["--stage", "dpo"]  # the default
    result, _ = dry_run(DEVICE="cpu", STAGE="both")
    assert result.returncode == 2 and result.stderr == "fast_train.sh: error: STAGE='both' must be dpo, ptune or all.\n"
    result, _ = dry_run(DEVICE="cpu", STAGE="all", PROMPT_EMBEDDING_PATH="/x.pt")
    assert result.returncode == 2 and "leave PROMPT_EMBEDDING_PATH empty" in result.stderr
    # a prompt learned already: STAGE=all goes on with DPO (rerunning after a kill in DPO resumes there)
    (out / "ptune").mkdir(parents=True)
    (out / "ptune" / SUMMARY_FILE).write_text("{}")
    result, commands = dry_run(DEVICE="cpu", STAGE="all", OUTPUT_DIR=str(out))
    assert [argv[-1] for argv in commands] == ["dpo"] and "already holds a learned prompt; using it" in result.stderr
    _, commands = dry_run(DEVICE="cpu", STAGE="all", OUTPUT_DIR=str(out), OVERWRITE="true")
    assert [argv[-1] for argv in commands] == ["ptune", "dpo"]


def event_scalars(path: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(path))
    accumulator.Reload()
    return {tag: [e.value for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def test_stage_all_end_to_end(tmp_path, tiny_model_dir, small_data):
    """The real launcher: learn a prompt (3 steps), write the file, train DPO in embedding mode with it (2 steps)."""
    env = {"STAGE": "all", "PTUNE_MAX_STEPS": "3", "MAX_STEPS": "2", "EVAL_STEPS": "100", "PER_DEVICE_BATCH_SIZE": "4"}
    out, logs, result = run_launcher(tmp_path, tiny_model_dir, small_data, **env)
    prompt_dir = out / "ptune"
    # the file embedding mode reads: one float32 [k, hidden] tensor, loadable without pickled code, twice
    embeddings = load_prompt(prompt_dir)
    assert embeddings.dtype == torch.float32 and embeddings.shape == (16, 64) and torch.isfinite(embeddings).all()
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(prompt_dir / SAFETENSORS_FILE))["prompt_embeddings"], embeddings)
    summary = json.loads((prompt_dir / SUMMARY_FILE).read_text())
    assert summary["global_step"] == 3 and summary["settings"]["num_virtual_tokens"] == 16
    assert summary["prompt_embeddings"] == {"key": "prompt_embeddings", "shape": [16, 64]}
    comparison = summary["held_out_comparison"]
    assert {"without_prompt", "preference_text", "initial_prompt", "learned_prompt"} <= set(comparison)
    assert all(row["pairs"] == 16 and 0 <= row["accuracy"] <= 1 for row in comparison.values())
    assert not {".tokenized", ".final_outputs_incomplete"} & {p.name for p in prompt_dir.iterdir()}
    # then DPO, in embedding mode with that file
    config = json.loads((out / "run_config.json").read_text())
    assert config["training"]["training_mode"] == "embedding"
    assert config["training"]["prompt_embedding_path"] == str(prompt_dir / EMBEDDING_FILE)
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    # TensorBoard: one events file per stage in LOG_DIR; the ptune stage's tags all under ptune/ and ptune_eval/
    events = sorted(logs.glob("events.out.tfevents*"), key=os.path.getmtime)
    assert len(events) == 2
    ptune_tags, dpo_tags = event_scalars(events[0]), event_scalars(events[1])
    assert {tag for pair in PTUNE_METRIC_TAGS.values() for tag in pair} <= set(ptune_tags)
    assert all(tag.startswith(("ptune/", "ptune_eval/")) for tag in ptune_tags), sorted(ptune_tags)
    assert len(ptune_tags["ptune/loss"]) == 3 and all(math.isfinite(v) for v in ptune_tags["ptune/loss"])
    assert "loss/train" in dpo_tags and not any(tag.startswith("ptune") for tag in dpo_tags)
    # the console: the held-out comparison, in the launcher's log with both stages
    log = next((logs / "runs").iterdir()).read_text()
    for row in ("without a prompt", "PREFERENCE_TEXT instruction", "initial soft prompt (text)",
                "learned soft prompt (16 tokens)"):  # fmt: skip
        assert row in log
    assert "Learned a 16-token soft prompt in 3 steps" in log and "Finished 2 steps" in log
    assert "(init text, encoder none, 1024 trainable parameters)" in log  # 16 x 64: the model is frozen

    # the same command again: the prompt is kept and reused, and the finished DPO run is not clobbered
    before = (prompt_dir / EMBEDDING_FILE).read_bytes()
    _, _, again = run_launcher(tmp_path, tiny_model_dir, small_data, expect_returncode=2, **env)
    assert "already holds a learned prompt; using it" in again.stderr
    assert "already holds a finished run" in again.stdout
    assert (prompt_dir / EMBEDDING_FILE).read_bytes() == before


def test_two_deepspeed_ranks_with_zero3_learn_the_same_prompt_as_one_process(tmp_path, tiny_model_dir, small_data):
    """1 process x 8 pairs vs 2 DeepSpeed CPU ranks x 4 pairs (ZeRO-3: the prompt is sharded and gathered to be
    saved), sequential order, 3 steps: the same prompt up to float rounding, one set of outputs, checkpoints
    without the frozen model. (Measured here: identical losses step by step; ZeRO-2 as well, and a SIGKILL after
    the step-2 checkpoint resumed to the same prompt under both stages.)"""
    train, _ = small_data
    env = {"STAGE": "ptune", "TEST_DATASET_PATH": "", "PTUNE_MAX_STEPS": "3", "SAVE_STEPS": "2", "LOGGING_STEPS": "1"}
    prompts = {}
    for name, extra in (
        ("single", {"PER_DEVICE_BATCH_SIZE": "8"}),
        # ALIGN_LOSS=hinge: settings are checked for the DPO stage as well (STAGE=all runs it next), and ZeRO-3
        # refuses the default ref_distill
        (
            "zero3",
            {
                "PER_DEVICE_BATCH_SIZE": "4",
                "CPU_RANKS": "2",
                "ZERO_STAGE": "3",
                "MASTER_PORT": "29581",
                "ALIGN_LOSS": "hinge",
            },
        ),
    ):
        out = tmp_path / name
        variables = {"DEVICE": "cpu", "POLICY_MODEL_PATH": str(tiny_model_dir), "TRAIN_DATASET_PATH": str(train),
                     "OUTPUT_DIR": str(out), "LOG_DIR": str(tmp_path / f"{name}_logs"), **env, **extra}  # fmt: skip
        result = subprocess.run(
            ["bash", str(REPO / "fast_train.sh"), "--train_sampling_strategy", "sequential"],
            env={**os.environ, **variables}, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        prompts[name] = load_prompt(out / "ptune")
        assert {p.name for p in (out / "ptune").iterdir()} == {
            "checkpoint-2", "checkpoint-3", EMBEDDING_FILE, SAFETENSORS_FILE, SUMMARY_FILE}  # fmt: skip
    torch.testing.assert_close(prompts["zero3"], prompts["single"], rtol=1e-5, atol=1e-5)
    checkpoint = tmp_path / "zero3" / "ptune" / "checkpoint-2"
    assert sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file()) < 200_000  # model: ~0.9 MB fp32


# --- a signal to one of two DeepSpeed ranks -------------------------------------------------------------------


def signal_one_rank(env: dict, logs: Path, rank: int, timeout: float = 90) -> tuple[int, str, float]:
    """Start fast_train.sh; once a training step is logged, SIGTERM the rank `rank` process alone (not the
    launcher, which would pass it on to every rank); return the exit status, the run's log and the seconds from
    the signal to the exit."""
    import signal
    import time

    import psutil

    from .test_reliability import kill_session

    proc = subprocess.Popen(["bash", str(REPO / "fast_train.sh")], env={**os.environ, **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the run never logged a step"
            log = next((logs / "runs").glob("train_*.log"), None) if (logs / "runs").is_dir() else None
            if log is not None and "{'loss'" in log.read_text():
                break
            time.sleep(0.1)
        (target,) = [p for p in psutil.process_iter(["cmdline"])
                     if os.getsid(p.pid) == proc.pid and f"--local_rank={rank}" in (p.info["cmdline"] or [])]  # fmt: skip
        signalled = time.monotonic()
        target.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        return code, log.read_text(), time.monotonic() - signalled
    finally:
        kill_session(proc.pid)


def test_sigterm_to_one_of_two_ranks_stops_both_with_one_checkpoint(tmp_path, tiny_model_dir, small_data):
    """2 DeepSpeed CPU ranks learning a prompt; SIGTERM reaches rank 1 only. Both ranks agree to stop at the same
    micro-batch, save one complete checkpoint and exit 128 + 15; neither goes on to the final outputs (a rank
    that went on alone would mark the stage finished at the stopped step, or wait in a collective)."""
    import re
    import signal

    from preference_dpo.checkpoints import COMPLETE_MARKER, checkpoints

    train, test = small_data
    out, logs = tmp_path / "out", tmp_path / "logs"
    env = {"DEVICE": "cpu", "CPU_RANKS": "2", "MASTER_PORT": "29583", "STAGE": "ptune",
           "POLICY_MODEL_PATH": str(tiny_model_dir), "TRAIN_DATASET_PATH": str(train), "TEST_DATASET_PATH": str(test),
           "PTUNE_MAX_STEPS": "500", "PER_DEVICE_BATCH_SIZE": "2", "LOGGING_STEPS": "1", "SAVE_STEPS": "1000",
           "EVAL_STEPS": "1000", "OUTPUT_DIR": str(out), "LOG_DIR": str(logs), "CACHE_DIR": str(tmp_path / "cache")}  # fmt: skip
    code, log, seconds = signal_one_rank(env, logs, rank=1)
    assert code == 128 + signal.SIGTERM and "Traceback" not in log, log[-3000:]
    prompt_dir = out / "ptune"
    assert not (prompt_dir / SUMMARY_FILE).exists() and not (prompt_dir / EMBEDDING_FILE).exists()
    ((step, folder),) = checkpoints(prompt_dir)
    assert 0 < step < 500 and (folder / COMPLETE_MARKER).exists()
    # each rank says where it stopped: the same step, the checkpoint it names is the one written
    stops = re.findall(r"Stopped by signal at step (\d+); checkpoint-(\d+) ", log)
    assert stops == [(str(step), str(step))] * 2, log[-3000:]
    assert seconds < 30  # well within DeepSpeed's grace before it kills the ranks


def test_a_signal_before_the_first_ptune_step_claims_no_checkpoint(common, capsys, monkeypatch, tmp_path):  # noqa: F811
    """SIGTERM in micro-batch 1 of step 1 (2 per step): the stage stops there, saves nothing, and says so."""
    import signal

    from preference_dpo.ptune import SoftPromptTrainer

    original = SoftPromptTrainer.training_step

    def signalled(self, *args, **kwargs):
        if self.state.global_step == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SoftPromptTrainer, "training_step", signalled)
    out = tmp_path / "prompt"
    argv = [*common, "--stage", "ptune", "--ptune_max_steps", "3", "--gradient_accumulation_steps", "2",
            "--per_device_train_batch_size", "2", "--test_dataset_path", "", "--ptune_output_dir", str(out)]  # fmt: skip
    code, _, log = run_main(argv, capsys, full_log=True)
    assert code == 128 + signal.SIGTERM
    assert "interrupted: Stopped by signal at step 0; no step had finished, nothing was saved." in log
    assert "checkpoint was saved" not in log and not list(out.glob("checkpoint-*"))
    assert not (out / SUMMARY_FILE).exists()


def test_nan_ptune_loss_stops_or_is_skipped_as_in_the_dpo_stage(common, capsys, monkeypatch, tmp_path):  # noqa: F811
    """The stage shares the DPO stage's NaN handling: from step 3 on the loss is NaN; exit 3 naming the step and the
    last good checkpoint, or with SKIP_NONFINITE_BATCHES the batches are skipped, counted, and the prompt stays finite."""
    import preference_dpo.ptune as ptune_module

    real = ptune_module.prompt_dpo_loss
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if calls["n"] >= 3 else value

    monkeypatch.setattr(ptune_module, "prompt_dpo_loss", flaky)
    steps = ["--stage", "ptune", "--ptune_max_steps", "4", "--save_steps", "2", "--test_dataset_path", ""]
    out = tmp_path / "prompt"
    code, errors = run_main([*common, *steps, "--ptune_output_dir", str(out)], capsys)
    assert code == 3 and len(errors) == 1
    assert errors[0].startswith("error: Step 3: the P-tuning loss is nan; stopped, the last good checkpoint is ")
    assert str(out / "checkpoint-2") in errors[0] and "PTUNE_LEARNING_RATE" in errors[0]

    calls["n"] = 0
    skipped = tmp_path / "skipped"
    argv = [*common, *steps, "--ptune_output_dir", str(skipped), "--skip_nonfinite_batches", "true"]
    assert run_main(argv, capsys)[0] == 0
    history = json.loads((skipped / SUMMARY_FILE).read_text())
    assert history["global_step"] == 4
    state = json.loads((skipped / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    assert [h["nonfinite_batches_skipped"] for h in state if "nonfinite_batches_skipped" in h] == [1.0, 2.0]
    assert torch.isfinite(load_prompt(skipped)).all()


@pytest.mark.parametrize("stage", ["dpo", "ptune"])
def test_training_ends_with_one_evaluation(common, capsys, tmp_path, monkeypatch, stage):  # noqa: F811
    """The Trainer evaluates at the last step (every eval strategy does); the stage reuses that result instead of
    evaluating the same weights again."""
    from preference_dpo.ptune import SoftPromptTrainer
    from preference_dpo.trainer import PreferenceGuidedDPOTrainer

    trainer_class = SoftPromptTrainer if stage == "ptune" else PreferenceGuidedDPOTrainer
    evaluated = []
    original = trainer_class.evaluate

    def counting(self, *args, **kwargs):
        evaluated.append(self.state.global_step)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(trainer_class, "evaluate", counting)
    steps = ["--max_steps", "4"] if stage == "dpo" else ["--training_mode", "embedding", "--ptune_max_steps", "4"]
    argv = [*common, "--stage", stage, *steps, "--eval_strategy", "steps", "--eval_steps", "2",
            "--num_sample_prompts", "0", "--ptune_output_dir", str(tmp_path / "prompt")]  # fmt: skip
    code, errors = run_main(argv, capsys)
    assert code == 0, errors
    assert evaluated == [0, 2, 4]
