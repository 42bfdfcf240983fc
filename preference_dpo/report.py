"""What the user reads: the summary at the start, the sample generations, and the report at the end.

The console gets a short, aligned summary and report; the full settings (every `TrainingArguments`
field) and every sample generation go to the log file (`--log_file`, which the launcher sets to its own
log) through the `preference_dpo.details` logger, and the settings to `run_config.json` at the end.
TensorBoard gets the samples as text (`metrics.SAMPLES_TAG`) and its first page from `metrics.story_layout`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from .metrics import SAMPLES_TAG

logger = logging.getLogger(__name__)
details = logging.getLogger("preference_dpo.details")  # the log file only (see `attach_log_file`)
details.propagate = False

MAX_SAMPLE_PROMPTS = 32  # prompts kept with the tokenized held-out set; NUM_SAMPLE_PROMPTS may not exceed it
TEXT_WIDTH = 110  # console lines of generated text are cut here


def attach_log_file(path: str | None, is_main_process: bool) -> None:
    """Send the `details` logger (full settings, every sample) to `path`, appended (the launcher's tee appends too)."""
    if not path or not is_main_process or details.handlers:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    details.addHandler(handler)
    details.setLevel(logging.INFO)


def log_settings(data_args, model_args, train_args) -> None:
    """Every resolved setting, to the log file only: the console gets the summary instead."""
    details.info(
        "Settings:\n%s",
        json.dumps(
            {
                "data": dataclasses.asdict(data_args),
                "model": dataclasses.asdict(model_args),
                "training": json.loads(train_args.to_json_string()),
            },
            indent=2,
            sort_keys=True,
            default=str,
        ),
    )


# --- the progress bar ------------------------------------------------------------------------------


class OneProgressBar(ProgressCallback):
    """transformers' progress bar, with an evaluation during training counted on the training bar ("eval 3/8")
    instead of on a second bar below it.

    The second bar is drawn by moving the cursor (a newline, then `ESC[A` back up) at every refresh: where the
    output is not a terminal (the launcher's log file, a pipe, CI) each refresh leaves a blank line and an
    `[A` fragment. An evaluation outside training (no training bar) keeps transformers' own bar.
    """

    def __init__(self):
        super().__init__()
        self._evaluated = 0

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if self.training_bar is None:
            return super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)
        if state.is_world_process_zero and eval_dataloader is not None:
            self._evaluated += 1
            self.training_bar.set_postfix_str(f"eval {self._evaluated}/{len(eval_dataloader)}")

    def on_evaluate(self, args, state, control, **kwargs):
        if self.training_bar is not None and self._evaluated:
            self.training_bar.set_postfix_str("")
        self._evaluated = 0
        return super().on_evaluate(args, state, control, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        """One short line per logging step on the console (`log_line`); TRL's whole dictionary goes to the log file
        (and, through the metrics callback, to TensorBoard)."""
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        details.info("step %d: %s", state.global_step, {k: v for k, v in logs.items() if k != "total_flos"})
        line = log_line(logs, state.global_step, state.max_steps)
        if line:
            self.training_bar.write(line)


# Console name -> key(s) in the trainer's logs, for a training and an evaluation log, in the order shown
_LINE_KEYS = {
    "train": (
        ("loss", "loss"),
        ("dpo", "dpo_loss"),
        ("aligned", "aligned_loss"),
        ("acc", "rewards/accuracies"),
        ("logp(chosen)", "logps/chosen"),
        ("lr", "learning_rate"),
    ),
    "eval": (
        ("loss", "eval_loss"),
        ("acc without/with", ("eval_accuracy_base", "eval_accuracy_guided")),
        ("margin without/with", ("eval_margin_base", "eval_margin_guided")),
        ("logp(chosen)", "eval_logps/chosen"),
        ("instruction gap", "eval_instruction_gap"),
    ),
}


def log_line(logs: dict, step: int, max_steps: int) -> str | None:
    """The few numbers that matter in one logging step, one line: `step 10/64  loss 2.81  dpo 0.690 ...`, or
    `eval at step 50/64  ...`; None for the end-of-training totals (the pipeline's summary says those)."""
    if "eval_loss" in logs:
        kind, head = "eval", f"eval at step {step}/{max_steps}"
    elif "loss" in logs:
        kind, head = "train", f"step {step}/{max_steps}"
    else:
        return None
    parts = [head]
    for name, keys in _LINE_KEYS[kind]:
        keys = keys if isinstance(keys, tuple) else (keys,)
        if all(key in logs for key in keys):
            parts.append(f"{name} " + "/".join(_short(logs[key]) for key in keys))
    return "  ".join(parts)


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def use_one_progress_bar(trainer) -> None:
    """Put `OneProgressBar` where the trainer has transformers' `ProgressCallback` (same place: callbacks run in
    order, and the throughput figures are added to the logs after the bar prints them)."""
    handler = trainer.callback_handler
    handler.callbacks = [OneProgressBar() if type(c) is ProgressCallback else c for c in handler.callbacks]


# --- the summary -----------------------------------------------------------------------------------


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def optimizer_steps(n_pairs: int, train_args) -> int:
    """Optimizer steps of the run, as transformers counts them (a last partial accumulation counts)."""
    if train_args.max_steps > 0:
        return train_args.max_steps
    batches = math.ceil(n_pairs / (train_args.per_device_train_batch_size * train_args.world_size))
    per_epoch = max(math.ceil(batches / train_args.gradient_accumulation_steps), 1)
    return math.ceil(per_epoch * train_args.num_train_epochs)


def tensorboard_command(train_args) -> str:
    """A TensorBoard command that lists this run under its RUN_NAME (runs are named after their folder)."""
    log_dir = os.path.normpath(train_args.log_dir)
    name = train_args.run_name or os.path.basename(log_dir)
    if os.path.basename(log_dir) == name:
        return f"tensorboard --logdir {os.path.dirname(log_dir) or '.'}"
    return f"tensorboard --logdir_spec {name}:{log_dir}"


def summary(data_args, model_args, train_args, n_train: int, n_test: int, num_soft_tokens: int) -> str:
    """The start-of-run summary: what runs, on what, and where its outputs go."""
    if train_args.training_mode == "embedding":
        instruction = f"{num_soft_tokens} soft tokens from {train_args.prompt_embedding_path}"
    else:
        instruction = f"text, {train_args.preference_position} message: {train_args.preference_text!r}"
    alpha = train_args.aligned_loss_weight
    objective = f"DPO ({', '.join(train_args.loss_type)}, BETA {train_args.beta:g})"
    objective += f" + ALPHA {alpha:g} x {train_args.align_loss}" if alpha > 0 else " only (ALPHA 0: plain DPO)"
    if alpha > 0 and train_args.align_loss in ("distill", "ref_distill"):
        teacher = f"top-{train_args.distill_top_k} teacher, " if train_args.distill_top_k else ""
        objective += f" ({teacher}{train_args.distill_reduction})"
    lora = "off: every weight trains"
    if model_args.use_peft:
        targets = model_args.lora_target_modules or []
        targets = targets if isinstance(targets, str) else ",".join(targets)
        lora = f"r {model_args.lora_r}, alpha {model_args.lora_alpha}, dropout {model_args.lora_dropout:g}, {targets}"
    ranks, per_device, accumulation = (
        train_args.world_size,
        train_args.per_device_train_batch_size,
        train_args.gradient_accumulation_steps,
    )
    steps = optimizer_steps(n_train, train_args)
    epochs = train_args.num_train_epochs
    length = f"{steps} steps" + (f" ({epochs:g} epoch{'s' * (epochs != 1)})" if train_args.max_steps <= 0 else "")
    evaluation = "off (no held-out set)"
    if n_test:
        # a resumed run has its evaluation before training in the checkpoint's history (eval_on_start is then off)
        before = "before training, " if train_args.eval_on_start else ""
        evaluation = f"{n_test} held-out pairs, {before}every {train_args.eval_steps:g} steps and at the end"
        if train_args.num_sample_prompts:
            evaluation += f"; {train_args.num_sample_prompts} sample prompts"
    precision = "bf16" if train_args.bf16 else "fp16" if train_args.fp16 else "fp32"
    cache = train_args.cache_dir if train_args.cache else "off"
    model = model_args.model_name_or_path
    if model_args.reference_model_path:
        model += f" (reference: {model_args.reference_model_path})"
    rows = [
        ("model", model),
        ("data", f"{n_train} train pairs ({data_args.train_dataset_path})"),
        ("instruction", instruction),
        ("objective", objective),
        ("LoRA", lora),
        (
            "batch",
            f"{ranks * per_device * accumulation} pairs per step ({ranks} rank x {per_device} x {accumulation} "
            f"accumulation), LR {train_args.learning_rate:g}",
        ),
        ("length", length),
        ("evaluation", evaluation),
        ("device", f"{train_args.device.type}, {precision}, {ranks} rank(s)"),
        ("cache", cache),
        ("adapter", str(train_args.output_dir)),
        ("logs", str(train_args.log_dir) + (f" (full settings: {train_args.log_file})" if train_args.log_file else "")),
        ("TensorBoard", f"{tensorboard_command(train_args)}  then open http://localhost:6006/#custom_scalars"),
    ]
    return f"Preference-guided DPO, run {train_args.run_name}\n{_table(rows)}"


# --- sample generations ------------------------------------------------------------------------------


def prompt_text(prompt: Any) -> str:
    """How a prompt is shown: the last user message of a conversation, or the plain-string prompt."""
    if isinstance(prompt, list):
        users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
        text = users[-1] if users else str(prompt[-1].get("content", ""))
    else:
        text = str(prompt)
    return " ".join(text.split())


def pick_sample_prompts(dataset, n: int = MAX_SAMPLE_PROMPTS) -> list[Any]:
    """The first `n` distinct prompts of a raw (untokenized) data set, in file order: fixed across runs."""
    chosen, seen = [], set()
    for prompt in dataset["prompt"]:
        key = json.dumps(prompt, sort_keys=True, ensure_ascii=False)
        if key not in seen:
            seen.add(key)
            chosen.append(prompt)
            if len(chosen) == n:
                break
    return chosen


@dataclass
class SamplePrompt:
    text: str
    base_ids: list[int]
    guided_ids: list[int]  # embedding mode: the base prompt then `k` placeholders for the soft tokens


def encode_sample_prompts(prompts: list[Any], tokenizer, tokenize_kwargs: dict[str, Any]) -> list[SamplePrompt]:
    """Both views of each prompt, tokenized exactly as training tokenizes them (`views.tokenize_views`)."""
    from .instruction import template_default_system
    from .views import tokenize_views

    default_system = ""
    conversational = bool(prompts) and isinstance(prompts[0], list)
    if conversational and not tokenize_kwargs["num_soft_tokens"] and tokenize_kwargs["preference_position"] == "system":
        default_system = template_default_system(tokenizer)  # the user position needs none (and may have none)
    encoded = []
    for prompt in prompts:
        # a one-token dummy response: only the prompts are used, computed as for a real pair
        dummy = [{"role": "assistant", "content": "x"}] if isinstance(prompt, list) else "x"
        row = {"prompt": prompt, "chosen": dummy, "rejected": dummy}
        views = tokenize_views(
            row,
            tokenizer,
            tokenize_kwargs["preference_text"],
            tokenize_kwargs["preference_position"],
            tokenize_kwargs["num_soft_tokens"],
            tokenize_kwargs["max_length"],
            default_system,
        )
        encoded.append(SamplePrompt(prompt_text(prompt), views["prompt_ids"], views["guided_prompt_ids"]))
    return encoded


@dataclass
class SampleGenerations(TrainerCallback):
    """Greedy generations for fixed held-out prompts, without and with the instruction, at each evaluation.

    Runs on the main process only (every rank under ZeRO-3, whose weights are sharded), after the
    evaluation and before the throughput callback restarts its clock, so it never counts as training
    time. Results go to TensorBoard (text), the log file, and `history` for the final report.
    """

    prompts: list[SamplePrompt]
    tokenizer: Any
    max_new_tokens: int
    tensorboard: Any
    prompt_embedding: Any = None
    # (prompts, each prompt's generated ids without the instruction) -> the instruction gap on those answers,
    # or None (`PreferenceGuidedDPOTrainer.generated_instruction_gap`; none without a reference)
    gap: Any = None
    history: dict[int, list[tuple[str, str]]] = field(default_factory=dict)
    gap_history: dict[int, float] = field(default_factory=dict)
    seconds: float = 0.0

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        from transformers.integrations import is_deepspeed_zero3_enabled

        zero3 = is_deepspeed_zero3_enabled()
        if not self.prompts or model is None or not (state.is_world_process_zero or zero3):
            return
        started = time.perf_counter()
        texts, generated = self.generate(model, synced_gpus=zero3)
        gap = self.gap(self.prompts, generated[: len(self.prompts)]) if self.gap is not None else None
        self.seconds += time.perf_counter() - started
        if not state.is_world_process_zero:
            return
        if gap is not None:
            self.gap_history[state.global_step] = gap
            self.tensorboard.on_log(args, state, control, logs={"eval_instruction_gap_generated": gap})
        pairs = list(zip(texts[: len(self.prompts)], texts[len(self.prompts) :], strict=True))
        self.history[state.global_step] = pairs
        # Also in the trainer's history, which every checkpoint keeps: a resumed run's report still has step 0.
        entry = {SAMPLES_KEY: [list(pair) for pair in pairs], "step": state.global_step}
        state.log_history.append(entry if gap is None else {**entry, "eval_instruction_gap_generated": gap})
        self.tensorboard.add_text(SAMPLES_TAG, samples_markdown(self.prompts, pairs), state.global_step)
        for prompt, (without, with_) in zip(self.prompts, pairs, strict=True):
            details.info(
                "Sample at step %d: %s\n  without: %s\n  with:    %s", state.global_step, prompt.text, without, with_
            )

    def generate(self, model, synced_gpus: bool = False) -> tuple[list[str], list[list[int]]]:
        """Greedy completions of every base prompt, then of every guided prompt: (texts, generated ids up to and
        including the first end-of-sequence token)."""
        import torch
        from transformers import GenerationConfig

        rows = [p.base_ids for p in self.prompts] + [p.guided_ids for p in self.prompts]
        width = max(map(len, rows))
        pad = self.tokenizer.pad_token_id
        device = next(model.parameters()).device
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)  # left-padded
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        embeddings = model.get_input_embeddings()
        was_training = model.training
        model.eval()
        with torch.no_grad():
            embeds = embeddings(ids)
            if self.prompt_embedding is not None:  # the guided rows end in k placeholders: the soft tokens
                k = self.prompt_embedding.shape[0]
                soft = self.prompt_embedding.to(device=device, dtype=embeds.dtype)
                embeds[len(self.prompts) :, -k:] = soft
            config = GenerationConfig(
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=self.tokenizer.eos_token_id,
                use_cache=True,
            )
            output = model.generate(
                inputs_embeds=embeds, attention_mask=mask, generation_config=config, synced_gpus=synced_gpus
            )
        model.train(was_training)
        texts = [" ".join(t.split()) for t in self.tokenizer.batch_decode(output, skip_special_tokens=True)]
        eos = self.tokenizer.eos_token_id
        generated = [row[: row.index(eos) + 1] if eos in row else row for row in output.tolist()]
        return texts, generated


def samples_markdown(prompts: list[SamplePrompt], pairs: list[tuple[str, str]]) -> str:
    """A markdown table for TensorBoard's text tab: prompt | without the instruction | with it."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|") or "(empty)"

    lines = ["| prompt | without the instruction | with the instruction |", "|---|---|---|"]
    lines += [f"| {cell(p.text)} | {cell(a)} | {cell(b)} |" for p, (a, b) in zip(prompts, pairs, strict=True)]
    return "\n".join(lines)


# --- the final report --------------------------------------------------------------------------------

# (label, metric key without the eval_ prefix, format); the margins and accuracies are the policy's own
# preference (logp(chosen) - logp(rejected)), without and with the instruction, not DPO's reward vs the reference
REPORT_ROWS = (
    ("pair accuracy, without the instruction", "accuracy_base", "{:.3f}"),
    ("pair accuracy, with the instruction", "accuracy_guided", "{:.3f}"),
    ("margin (nats), without the instruction", "margin_base", "{:.2f}"),
    ("margin (nats), with the instruction", "margin_guided", "{:.2f}"),
    ("pref_advantage_ratio", "pref_advantage_ratio", "{:.3g}"),
    ("aligned_active_frac", "aligned_active_frac", "{:.3f}"),
    ("logp(chosen), without the instruction", "logps/chosen", "{:.2f}"),
    ("instruction gap (KL per token, nats)", "instruction_gap", "{:.3f}"),
    ("reward accuracy (DPO, vs the reference)", "rewards/accuracies", "{:.3f}"),
    ("reward margin (DPO)", "rewards/margins", "{:.3f}"),
)


def first_evaluation(log_history: list[dict]) -> dict[str, float] | None:
    """The evaluation logged before training (step 0), from the trainer's history (kept across resumes)."""
    for entry in log_history:
        if entry.get("step") == 0 and "eval_loss" in entry:
            return entry
    return None


SAMPLES_KEY = "sample_generations"  # the trainer's history entry of an evaluation's samples: [[without, with], ...]


def sample_histories(log_history: list[dict], samples) -> tuple[dict, dict]:
    """({step: [(without, with), ...]}, {step: instruction gap on those answers}) of every evaluation: from the
    trainer's history (kept across resumes), else from `samples` (a run whose history lacks them)."""
    history = {e["step"]: [tuple(pair) for pair in e[SAMPLES_KEY]] for e in log_history if SAMPLES_KEY in e}
    gaps = {e["step"]: e["eval_instruction_gap_generated"] for e in log_history if SAMPLES_KEY in e
            and "eval_instruction_gap_generated" in e}  # fmt: skip
    if not history and samples is not None:
        return samples.history, samples.gap_history
    return history, gaps


def closed_share(old: float, new: float) -> str:
    """What training did to an instruction gap, in words: the share closed, or how much it grew."""
    if new <= old:
        return f"{1 - new / old:.0%} of it closed"
    grew = f"{new / old - 1:.0%}" if new < 2 * old else f"{new / old:.1f}x"
    return f"it grew {grew} (the policy without the instruction moved away from the instructed reference)"


def rewards_all_zero(entry: dict) -> bool:
    """Whether the DPO rewards are all about 0, as before training, when the policy is the reference (LoRA starts
    at zero). Its reward accuracy then says nothing about the model: 0 where the rewards are exactly 0, and a
    share of pairs won by float noise (1e-8 nats; 0.243 on SmolLM2) where they are not."""
    return abs(entry.get("eval_rewards/margins", 1.0)) < 1e-6 and abs(entry.get("eval_rewards/chosen", 0.0)) < 1e-6


def transfer_line(before: dict, after: dict) -> str | None:
    """How much of the instruction's effect on the held-out margin the un-instructed model now shows."""
    keys = ("eval_margin_base", "eval_margin_guided")
    if not all(k in before for k in keys) or "eval_margin_base" not in after:
        return None
    base, instructed, trained = before[keys[0]], before[keys[1]], after[keys[0]]
    effect = instructed - base
    if abs(effect) < 1e-6:
        return "Transfer: the instruction did not change the untrained model's held-out margin; nothing to transfer."
    share = (trained - base) / effect
    head = (
        f"Transfer: without the instruction, the held-out margin went from {base:.2f} to {trained:.2f} nats; "
        f"with it, the untrained model's was {instructed:.2f}: "
    )
    if share > 1:  # the pairs moved the margin further than the instruction does: not the instruction's doing
        return head + (
            f"{share:.1f}x the instruction's effect, more than the instruction itself does: DPO on these pairs moved "
            "this margin past it, so it says nothing about the instruction (the instruction gap does)."
        )
    if share < 0:  # e.g. an instruction that lowers the margin, which DPO raises
        return head + (
            "training moved it the other way from the instruction's effect, so it says nothing about the "
            "instruction (the instruction gap does)."
        )
    return head + (
        f"{share:.0%} of the instruction's effect now shows without it (DPO on these pairs moves this margin too: "
        "compare a run with ALPHA=0)."
    )


def gap_line(before: dict, after: dict) -> str | None:
    """The share of the instruction gap (docs/method.md, "Instruction gap") that training closed."""
    key = "eval_instruction_gap"
    if key not in before or key not in after or before[key] <= 1e-9:
        return None
    old, new = before[key], after[key]
    return (
        f"Instruction gap: KL(reference with the instruction || policy without it) went from {old:.3f} to {new:.3f} "
        f"nats per token of the held-out chosen responses: {closed_share(old, new)}."
    )


def overoptimisation_line(before: dict, after: dict) -> str | None:
    """A warning when logp(chosen) without the instruction fell clearly: the documented sign of over-optimisation."""
    key = "eval_logps/chosen"
    if key not in before or key not in after:
        return None
    old, new = before[key], after[key]
    if new >= old - max(2.0, 0.1 * abs(old)):
        return None
    return (
        f"Watch: logp(chosen) without the instruction fell from {old:.2f} to {new:.2f} nats: the model is being "
        'over-optimised (docs/method.md, "Known behaviour of the aligned loss"); lower LEARNING_RATE or ALPHA, '
        "or train fewer steps."
    )


# The training-pairs watch: logp(chosen) without the instruction, on the pairs being trained, fell by more than
# both of these from its first logged value. DPO lowers it a little as a rule (a few nats); on SmolLM2 at 5e-4 a
# collapse to empty answers took it from about -20 to -146, while a fluent run went from -21 to -30.
COLLAPSE_FALL_NATS = 10.0
COLLAPSE_FALL_SHARE = 0.5  # of its first value's magnitude


def collapse_fall(first: float, now: float) -> bool:
    fall = first - now
    return fall > COLLAPSE_FALL_NATS and fall > COLLAPSE_FALL_SHARE * abs(first)


def train_logps(log_history: list[dict]) -> list[tuple[int, float]]:
    """(step, logp(chosen) of the trained pairs, base view) of every training log."""
    return [(e["step"], e["logps/chosen"]) for e in log_history if "logps/chosen" in e and "loss" in e]


TRAIN_BEFORE_KEY = "train_logps_chosen_before"  # the trainer's history entry of the baseline below


def recorded_before(log_history: list[dict]) -> float | None:
    """The training pairs' logp(chosen) before training, where the run recorded it (`CollapseWatch.before`)."""
    return next((e[TRAIN_BEFORE_KEY] for e in log_history if TRAIN_BEFORE_KEY in e), None)


def collapse_line(log_history: list[dict]) -> str | None:
    """The report's warning when logp(chosen) on the training pairs fell as a collapsing model's does (a run
    without a held-out set included). Measured from before training where the run recorded it (the first training
    log averages a whole logging window, by which a fast collapse is done), else from the first training log."""
    logged, before = train_logps(log_history), recorded_before(log_history)
    if before is not None and logged:
        where, first = "before training", before
    elif len(logged) >= 2:
        where, first = f"at step {logged[0][0]}", logged[0][1]
    else:
        return None
    last_step, last = logged[-1]
    if not collapse_fall(first, last):
        return None
    return (
        f"Watch: logp(chosen) fell from {first:.1f} ({where}) to {last:.1f} nats on the training pairs "
        f"(step {last_step}), more than {COLLAPSE_FALL_NATS:g} nats and {COLLAPSE_FALL_SHARE:.0%}: the model may be "
        "collapsing (empty or repeated answers); lower LEARNING_RATE or ALPHA, or train fewer steps."
    )


class CollapseWatch(TrainerCallback):
    """Warns once, during training, when logp(chosen) on the training pairs falls as in `collapse_line`."""

    def __init__(self, before: float | None = None) -> None:
        # the mean logp(chosen) of the training pairs before training (the reference's, precomputed), or None
        self.before = before
        self.first: tuple[str, float] | None = None  # (where, logp(chosen)) the fall is measured from
        self.warned = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.warned or not logs:
            return
        value = logs.get("logps/chosen")
        if value is None or "loss" not in logs:
            return
        if self.first is None:
            # kept in the trainer's history, which checkpoints keep: a resumed run measures from the same value
            if self.before is not None and recorded_before(state.log_history) is None:
                state.log_history.insert(0, {"step": 0, TRAIN_BEFORE_KEY: self.before})
            before = recorded_before(state.log_history)
            self.first = ("before training", before) if before is not None else None
        if self.first is None:
            self.first = (f"at step {state.global_step}", value)
        elif collapse_fall(self.first[1], value) and state.is_world_process_zero:
            self.warned = True
            logger.warning(
                "logp(chosen) fell from %.1f (%s) to %.1f nats on the training pairs (step %d): the model may be "
                "collapsing; lower LEARNING_RATE or ALPHA, or train fewer steps.",
                self.first[1], self.first[0], value, state.global_step,
            )  # fmt: skip


def _cut(text: str) -> str:
    return text if len(text) <= TEXT_WIDTH else text[: TEXT_WIDTH - 3] + "..."


def report(
    run_name: str,
    final_metrics: dict[str, float],
    log_history: list[dict],
    samples: SampleGenerations | None,
    timing: dict[str, float],
    steps: int,
    output_dir: str,
    tensorboard: str,
) -> str:
    """The end-of-run report: held-out measures before and after, transfer, sample generations, costs, paths."""
    lines = [f"Report for run {run_name}"]
    before = first_evaluation(log_history)
    if final_metrics:
        lines.append(f"  {'held-out pairs':<46}  {'before':>8}  {'after':>8}")
        tied = before is not None and rewards_all_zero(before)
        for label, key, fmt in REPORT_ROWS:
            after_value = final_metrics.get(f"eval_{key}")
            if after_value is None:
                continue
            before_value = before.get(f"eval_{key}") if before else None
            shown = fmt.format(before_value) if before_value is not None else "-"
            if key == "rewards/accuracies" and tied:
                shown = "n/a"
            lines.append(f"  {label:<46}  {shown:>8}  {fmt.format(after_value):>8}")
        if tied:
            lines.append(
                "  (n/a: all rewards about 0 before training, the policy being the reference: no pair can be won)"
            )
        lines_after = (transfer_line, gap_line, overoptimisation_line)
        for line in (describe_change(before or {}, final_metrics) for describe_change in lines_after):
            if line:
                lines.append(line)
    history, gap_history = sample_histories(log_history, samples)
    if len(gap_history) > 1:
        first, last = min(gap_history), max(gap_history)
        old_gap, new_gap = gap_history[first], gap_history[last]
        closed = f": {closed_share(old_gap, new_gap)}" if old_gap > 1e-9 else ""
        lines.append(
            f"Instruction gap on the model's own greedy answers to the sample prompts: {old_gap:.3f} (step {first}) "
            f"to {new_gap:.3f} nats per token (step {last}){closed}."
        )
    collapse = collapse_line(log_history)
    if collapse:
        lines.append(collapse)
    if samples is not None and history:
        first, last = min(history), max(history)
        lines.append(
            f"Sample generations (greedy, up to {samples.max_new_tokens} new tokens; all steps in TensorBoard's TEXT tab):"
        )
        for i, prompt in enumerate(samples.prompts):
            lines.append(f"  {_cut(prompt.text)}")
            lines.append(f"    step {first}, with the instruction:    {_cut(history[first][i][1])}")
            lines.append(f"    step {first}, without the instruction: {_cut(history[first][i][0])}")
            if last != first:
                lines.append(f"    step {last}, without the instruction: {_cut(history[last][i][0])}")
    costs = ", ".join(
        f"{name} {seconds:.0f} s" if seconds >= 10 else f"{name} {seconds:.1f} s" for name, seconds in timing.items()
    )
    lines.append(f"Finished {steps} steps: {costs}.")
    lines.append(f"Adapter in {output_dir}; TensorBoard: {tensorboard}")
    return "\n".join(lines)
