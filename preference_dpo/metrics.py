"""TensorBoard tags: the one table from trainer log keys to METHOD.md's tag names, and its writer.

Metric names are an API: dashboards and comparisons depend on them. Keys not in the table (TRL's and
transformers' other metrics: learning rate, grad norm, entropy, ...) keep their names under `train/`
or `eval/`, as transformers' own TensorBoard callback writes them.
"""

from __future__ import annotations

import logging
import math
import os

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

# trainer log key -> (train tag, eval tag); eval keys arrive as "eval_<key>"
METRIC_TAGS: dict[str, tuple[str, str]] = {
    "loss": ("loss/train", "loss/eval"),
    "dpo_loss": ("loss_components/dpo_loss", "loss_components_eval/dpo_loss"),
    "aligned_loss": ("loss_components/aligned_loss", "loss_components_eval/aligned_loss"),
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
}

# Tags written only when the guided view runs in training (ALPHA > 0); evaluation always writes them.
GUIDED_KEYS = ("aligned_loss", "pref_advantage_ratio", "pref_delta_w", "pref_delta_l", "aligned_active_frac")


def tensorboard_tag(key: str) -> str:
    """The TensorBoard tag for a key of the trainer's `logs` dict."""
    if key.startswith("eval_"):
        name = key.removeprefix("eval_")
        return METRIC_TAGS[name][1] if name in METRIC_TAGS else f"eval/{name}"
    return METRIC_TAGS[key][0] if key in METRIC_TAGS else f"train/{key}"


class TensorBoardMetricsCallback(TrainerCallback):
    """Writes every logged scalar to one events file directly in `log_dir`, on the main process only."""

    def __init__(self, log_dir: str):
        self.log_dir = log_dir
        self._writer = None

    def _get_writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(self.log_dir, exist_ok=True)
            self._writer = SummaryWriter(log_dir=self.log_dir)
        return self._writer

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        writer = self._get_writer()
        for key, value in logs.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):
                logger.warning("Step %d: metric %s is %s", state.global_step, key, value)
            writer.add_scalar(tensorboard_tag(key), value, state.global_step)
        writer.flush()

    def on_train_end(self, args, state, control, **kwargs):
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
