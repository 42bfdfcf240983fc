"""TensorBoard tags: the one table from trainer log keys to the tag names of docs/method.md, its writer,
and the custom-scalars layout that is the run's first page in TensorBoard.

Metric names are an API: dashboards and comparisons depend on them. Keys not in the table (TRL's and
transformers' other metrics: learning rate, grad norm, entropy, ...) keep their names under `train/`
or `eval/`, as transformers' own TensorBoard callback writes them.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from pathlib import Path

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

# trainer log key -> (train tag, eval tag); eval keys arrive as "eval_<key>"
METRIC_TAGS: dict[str, tuple[str, str]] = {
    "loss": ("loss/train", "loss/eval"),
    "dpo_loss": ("loss_components/dpo_loss", "loss_components_eval/dpo_loss"),
    "aligned_loss": ("loss_components/aligned_loss", "loss_components_eval/aligned_loss"),
    # the same value under the name of the form that is on (ALIGN_LOSS), so runs of different forms compare
    "hinge_loss": ("loss_components/hinge_loss", "loss_components_eval/hinge_loss"),
    "ref_hinge_loss": ("loss_components/ref_hinge_loss", "loss_components_eval/ref_hinge_loss"),
    "distill_loss": ("loss_components/distill_loss", "loss_components_eval/distill_loss"),
    "ref_distill_loss": ("loss_components/ref_distill_loss", "loss_components_eval/ref_distill_loss"),
    "onpolicy_distill_loss": (
        "loss_components/onpolicy_distill_loss",
        "loss_components_eval/onpolicy_distill_loss",
    ),
    "context_distill_loss": (
        "loss_components/context_distill_loss",
        "loss_components_eval/context_distill_loss",
    ),
    # ALIGN_LOSS=onpolicy_distill, training only: the share of steps on the policy's own answers, their length
    "onpolicy_frac": ("preference_metrics/onpolicy_frac", "preference_metrics_eval/onpolicy_frac"),
    "onpolicy_generated_length": (
        "preference_metrics/onpolicy_generated_length",
        "preference_metrics_eval/onpolicy_generated_length",
    ),
    "rewards/accuracies": ("rewards_train/accuracy", "rewards_eval/accuracy"),
    "rewards/chosen": ("rewards_train/chosen", "rewards_eval/chosen"),
    "rewards/rejected": ("rewards_train/rejected", "rewards_eval/rejected"),
    "rewards/margins": ("rewards_train/margin", "rewards_eval/margin"),
    "pref_advantage_ratio": (
        "preference_metrics/pref_advantage_ratio",
        "preference_metrics_eval/pref_advantage_ratio",
    ),
    "pref_delta_w": ("preference_metrics/pref_delta_w", "preference_metrics_eval/pref_delta_w"),
    "pref_delta_l": ("preference_metrics/pref_delta_l", "preference_metrics_eval/pref_delta_l"),
    "aligned_active_frac": (
        "preference_metrics/aligned_active_frac",
        "preference_metrics_eval/aligned_active_frac",
    ),
    "logps/chosen": ("logps_train/chosen", "logps_eval/chosen"),
    "logps/rejected": ("logps_train/rejected", "logps_eval/rejected"),
    # the instruction's effect on the policy itself: h_base and h_pref per pair, summarised
    "accuracy_base": ("preference_metrics/accuracy_base", "preference_metrics_eval/accuracy_base"),
    "accuracy_guided": ("preference_metrics/accuracy_guided", "preference_metrics_eval/accuracy_guided"),
    "margin_base": ("preference_metrics/margin_base", "preference_metrics_eval/margin_base"),
    "margin_guided": ("preference_metrics/margin_guided", "preference_metrics_eval/margin_guided"),
    # evaluation only: how far the policy without the instruction is from the reference with it, per token
    "instruction_gap": ("preference_metrics/instruction_gap", "preference_metrics_eval/instruction_gap"),
    # the same on the policy's own greedy answers to the sample prompts (NUM_SAMPLE_PROMPTS > 0)
    "instruction_gap_generated": (
        "preference_metrics/instruction_gap_generated",
        "preference_metrics_eval/instruction_gap_generated",
    ),
}

# Keys logged in evaluation only: their train tags are never written.
EVAL_ONLY_KEYS = ("instruction_gap", "instruction_gap_generated")
# Keys logged in training only: their eval tags are never written.
TRAIN_ONLY_KEYS = ("onpolicy_frac", "onpolicy_generated_length")


def form_keys(align_loss: str) -> set[str]:
    """The keys only a run of ALIGN_LOSS=`align_loss` logs among those of every form (its `<form>_loss`, and
    the on-policy form's own metrics)."""
    from .forms import FORMS

    keys = {f"{name}_loss": name for name in FORMS}
    keys |= {key: "onpolicy_distill" for key in TRAIN_ONLY_KEYS}
    return {key for key, form in keys.items() if form == align_loss}


def logged_tags(align_loss: str) -> tuple[set[str], set[str]]:
    """(the tags a run of `align_loss` with ALPHA > 0 and a test set writes, those it must not write)."""
    from .forms import FORMS, form_class

    others = {key for name in FORMS if name != align_loss for key in form_keys(name)}
    written = {tag for key, pair in METRIC_TAGS.items() if key not in others for tag in pair}
    written -= {METRIC_TAGS[key][0] for key in EVAL_ONLY_KEYS} | {METRIC_TAGS[key][1] for key in TRAIN_ONLY_KEYS}
    if form_class(align_loss).teacher == "reference":  # no guided forward of the policy in training
        written -= {METRIC_TAGS[key][0] for key in POLICY_GUIDED_KEYS}
    return written, {tag for key in others for tag in METRIC_TAGS[key]}


# The policy's guided view's statistics: in training only where the form's teacher is the policy itself.
POLICY_GUIDED_KEYS = ("pref_advantage_ratio", "pref_delta_w", "pref_delta_l", "accuracy_guided", "margin_guided")

# Tags written only when the guided view runs in training (ALPHA > 0); evaluation always writes them.
GUIDED_KEYS = (
    "aligned_loss",
    "pref_advantage_ratio",
    "pref_delta_w",
    "pref_delta_l",
    "aligned_active_frac",
    "accuracy_base",
    "accuracy_guided",
    "margin_base",
    "margin_guided",
)

SAMPLES_TAG = "samples/greedy"  # TensorBoard text: the sample generations at each evaluation
EVENTS_PREFIX = "events.out.tfevents."  # SummaryWriter's file names; TensorBoard reads any name with "tfevents"
# The ptune stage writes into the DPO stage's LOG_DIR; its files end in this, so that OVERWRITE of one stage
# removes that stage's files and leaves the other's (STAGE=all with OVERWRITE: ptune's new file, then DPO).
PTUNE_EVENTS_SUFFIX = ".ptune"


def _tags(*keys: str, eval_only: bool = False) -> list[str]:
    """Regexes matching exactly the train and eval tags of `keys` (custom-scalars charts take regexes)."""
    tags = [tag for key in keys for tag in METRIC_TAGS[key][1 if eval_only else 0 :]]
    return [f"^{re.escape(tag)}$" for tag in tags]


def story_layout(ptune: bool = False) -> dict[str, dict[str, list]]:
    """The custom-scalars page (TensorBoard's CUSTOM SCALARS tab): the run's story, in reading order.

    Losses; whether the model prefers the chosen answers; the instruction's effect with and without it on
    held-out pairs (the method's point); and the over-optimisation watch (`logps_*/chosen`).
    """
    layout = {
        "1 Loss": {
            "loss (train, eval)": ["Multiline", _tags("loss")],
            "loss components, train": ["Multiline", [r"^loss_components/.*"]],
            "loss components, eval": ["Multiline", [r"^loss_components_eval/.*"]],
        },
        "2 Preference for the chosen answer": {
            "reward accuracy (train, eval)": ["Multiline", _tags("rewards/accuracies")],
            "held-out pair accuracy, without vs with the instruction": [
                "Multiline",
                _tags("accuracy_base", "accuracy_guided", eval_only=True),
            ],
            "held-out margin (nats), without vs with the instruction": [
                "Multiline",
                _tags("margin_base", "margin_guided", eval_only=True),
            ],
        },
        "3 The instruction's effect": {
            "pref_advantage_ratio (train, eval)": ["Multiline", _tags("pref_advantage_ratio")],
            "aligned_active_frac (train, eval)": ["Multiline", _tags("aligned_active_frac")],
            "instruction gap, KL per token (eval: chosen responses, own answers)": [
                "Multiline",
                _tags("instruction_gap", "instruction_gap_generated", eval_only=True),
            ],
        },
        "4 Over-optimisation watch": {
            "logp(chosen), base view (train, eval)": ["Multiline", _tags("logps/chosen")],
            "logp(rejected), base view (train, eval)": ["Multiline", _tags("logps/rejected")],
        },
    }
    if ptune:  # the learned-prompt stage runs first: its page comes first
        layout = {"0 Learned preference prompt (ptune)": {"ptune": ["Multiline", [r"^ptune/.*"]]}, **layout}
    return layout


def tensorboard_tag(key: str) -> str:
    """The TensorBoard tag for a key of the trainer's `logs` dict."""
    if key.startswith("eval_"):
        name = key.removeprefix("eval_")
        return METRIC_TAGS[name][1] if name in METRIC_TAGS else f"eval/{name}"
    return METRIC_TAGS[key][0] if key in METRIC_TAGS else f"train/{key}"


# The stage that learns the soft prompt (STAGE=ptune) logs into the same LOG_DIR as the DPO stage, so every
# one of its tags, transformers' own included (ptune/learning_rate, ptune_eval/runtime), is under ptune/.
PTUNE_METRIC_TAGS: dict[str, tuple[str, str]] = {
    "loss": ("ptune/loss", "ptune_eval/loss"),
    "accuracy": ("ptune/accuracy", "ptune_eval/accuracy"),
    "margin": ("ptune/margin", "ptune_eval/margin"),
}


def ptune_tensorboard_tag(key: str) -> str:
    """The TensorBoard tag for a key of the ptune stage's `logs` dict."""
    if key.startswith("eval_"):
        name = key.removeprefix("eval_")
        return PTUNE_METRIC_TAGS[name][1] if name in PTUNE_METRIC_TAGS else f"ptune_eval/{name}"
    return PTUNE_METRIC_TAGS[key][0] if key in PTUNE_METRIC_TAGS else f"ptune/{key}"


def stage_event_files(log_dir: str | os.PathLike, ptune: bool = False) -> list[Path]:
    """The TensorBoard event files one stage wrote directly in `log_dir`: the ptune stage's (`ptune`), or the
    DPO stage's (every other one). Subfolders (the launcher's `runs/`) are not looked into."""
    folder = Path(log_dir)
    if not folder.is_dir():
        return []
    found = (p for p in folder.iterdir() if p.name.startswith(EVENTS_PREFIX) and p.is_file())
    return sorted(p for p in found if p.name.endswith(PTUNE_EVENTS_SUFFIX) == ptune)


def remove_stage_event_files(log_dir: str | os.PathLike, ptune: bool = False) -> list[str]:
    """OVERWRITE: delete the replaced run's event files of one stage (`stage_event_files`); return their names.

    A new run writes a new file beside the old ones, and TensorBoard shows every file of a folder as one run:
    the two runs' points would interleave on every chart.
    """
    removed = stage_event_files(log_dir, ptune)
    for path in removed:
        path.unlink()
    return [path.name for path in removed]


class TensorBoardMetricsCallback(TrainerCallback):
    """Writes every logged scalar to one events file directly in `log_dir`, on the main process only,
    with the custom-scalars layout (`story_layout`) as the run's first page."""

    def __init__(self, log_dir: str, tag=tensorboard_tag, layout: dict | None = None, filename_suffix: str = ""):
        self.log_dir = log_dir
        self.tag = tag  # log key -> tag: `tensorboard_tag`, or `ptune_tensorboard_tag` for the ptune stage
        self.layout = story_layout() if layout is None else layout
        self.filename_suffix = filename_suffix  # PTUNE_EVENTS_SUFFIX for the ptune stage
        self._writer = None

    def _get_writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(self.log_dir, exist_ok=True)
            self._writer = SummaryWriter(log_dir=self.log_dir, filename_suffix=self.filename_suffix)
            self._writer.add_custom_scalars(self.layout)
        return self._writer

    def add_text(self, tag: str, text: str, step: int) -> None:
        """A markdown text (TensorBoard's TEXT tab), e.g. the sample generations; main process only."""
        self._get_writer().add_text(tag, text, step)
        self._writer.flush()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        writer = self._get_writer()
        for key, value in logs.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):
                logger.warning("Step %d: metric %s is %s", state.global_step, key, value)
            writer.add_scalar(self.tag(key), value, state.global_step)
        writer.flush()

    def on_train_end(self, args, state, control, **kwargs):
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def peak_memory_bytes() -> int:
    """Peak GPU memory allocated on this device, or the process's peak resident memory on CPU."""
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class ThroughputCallback(TrainerCallback):
    """Adds `samples_per_second` and `tokens_per_second` (training time only) to every training log,
    and logs a one-line summary when training ends.

    Tokens are TRL's `num_tokens` count (non-padding tokens of the base view, all ranks); samples are
    pairs, `global_step x per-device batch x accumulation x ranks`.
    """

    def __init__(self):
        self._window = None  # (time, step, tokens) at the start of the current logging window
        self._train_seconds = 0.0
        self._timed_steps = 0  # steps inside closed logging windows: the ones `_train_seconds` covers
        self._tokens = 0

    def _pairs_per_step(self, args) -> int:
        return args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size

    def on_train_begin(self, args, state, control, **kwargs):
        self._start_step = state.global_step
        self._window = (time.perf_counter(), state.global_step, 0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs or self._window is None:
            return  # evaluation and end-of-training logs
        now = time.perf_counter()
        start, step, tokens = self._window
        seconds = now - start
        self._tokens = int(logs.get("num_tokens", tokens))
        if seconds > 0:
            logs["samples_per_second"] = (state.global_step - step) * self._pairs_per_step(args) / seconds
            logs["tokens_per_second"] = (self._tokens - tokens) / seconds
        self._train_seconds += seconds
        self._timed_steps += state.global_step - step
        self._window = (now, state.global_step, self._tokens)

    def on_evaluate(self, args, state, control, **kwargs):
        if self._window is not None:  # leave evaluation time out of the next window
            _, step, tokens = self._window
            self._window = (time.perf_counter(), step, tokens)

    def summary(self, args, state, wall_seconds: float) -> str:
        steps = state.global_step - self._start_step
        memory = f"peak memory {peak_memory_bytes() / 2**30:.2f} GiB"
        if self._train_seconds <= 0:
            # No logging window closed (fewer steps than LOGGING_STEPS): there is no measured time to divide by.
            return (
                f"wall {wall_seconds:.0f} s, {steps} steps, throughput not measured (no training step was logged; "
                f"LOGGING_STEPS={args.logging_steps:g}), {memory}"
            )
        pairs = self._timed_steps * self._pairs_per_step(args)  # steps after the last log were not timed
        train = self._train_seconds
        return (
            f"wall {wall_seconds:.0f} s, {steps} steps, {pairs / train:.2f} samples/s (pairs), "
            f"{self._tokens / train:.0f} tokens/s over {train:.0f} s of training steps (evaluation excluded, "
            f"logged windows only), {memory}"
        )
