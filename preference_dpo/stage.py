"""The steps both stages share (the DPO stage, `pipeline.py`; the soft-prompt stage, `ptune.py`).

Each stage is a short recipe: check the inputs without weights -> tokenize -> find where to start -> load ->
build its trainer -> `train_and_evaluate` -> save -> report. What is shared lives here and in `faults.py`
(signals the ranks agree on, non-finite losses, resume and overwrite); a stage keeps only what is its own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version

from .errors import UserInputError
from .faults import end_if_stopped, train
from .variables import describe

logger = logging.getLogger(__name__)

LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "deepspeed", "tokenizers")
STAGING_DIR = ".final_outputs_incomplete"
TOKENIZED_DIR = ".tokenized"


def check_causal_lm(path: str, flag: str, trust_remote_code: bool, revision: str | None = None):
    """The model's config, loaded without weights (a Hub id: from the cache, or downloaded); `UserInputError`
    unless it is a causal LM."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserInputError(f"{describe(flag)} {path!r}: cannot load a model config ({first_line}).") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UserInputError(
            f"{describe(flag)} {path!r}: model type {config.model_type!r} is not a causal language model."
        )
    return config


def load_tokenizer(model_args, train_args):
    """The policy's tokenizer at its revision, with a pad token (its end-of-sequence token if it has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path, trust_remote_code=train_args.trust_remote_code,
        revision=model_args.model_revision,
    )  # fmt: skip
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenize_settings(train_args, num_soft_tokens: int) -> dict:
    """The settings `views.tokenize_preference_dataset` builds both views with."""
    return {
        "preference_text": train_args.preference_text,
        "preference_position": train_args.preference_position,
        "num_soft_tokens": num_soft_tokens,
        "max_length": train_args.max_length,
        "max_prompt_length": train_args.max_prompt_length,
        "num_proc": train_args.dataset_num_proc,
    }


def model_dtype(train_args):
    import torch

    return torch.bfloat16 if train_args.bf16 else torch.float16 if train_args.fp16 else torch.float32


@dataclass
class Trained:
    """What training left: the trained weights' evaluation metrics (empty without a test set) and the times."""

    final_metrics: dict[str, float]
    train_seconds: float
    evaluation_seconds: float | None  # None: the Trainer's own last evaluation served (or no test set)


def train_and_evaluate(trainer, stopper, resume_from, output_dir, tensorboard, has_test_set: bool,
                       on_trained: Callable[[float], None] | None = None) -> Trained:  # fmt: skip
    """Train from `resume_from`; `on_trained(seconds)`; end the process if a signal stopped it (one checkpoint,
    exit 128+signal, `faults.end_if_stopped`); then the trained weights' evaluation; TensorBoard closed."""
    started = time.monotonic()
    train(trainer, stopper, resume_from)
    train_seconds = time.monotonic() - started
    if on_trained is not None:
        on_trained(train_seconds)
    end_if_stopped(trainer, stopper, output_dir, before_stop=tensorboard.close)
    final_metrics, evaluation_seconds = {}, None
    if has_test_set:
        started = time.monotonic()
        final_metrics, evaluated = final_evaluation(trainer)
        evaluation_seconds = time.monotonic() - started if evaluated else None
    tensorboard.close()
    return Trained(final_metrics, train_seconds, evaluation_seconds)


def final_evaluation(trainer) -> tuple[dict[str, float], bool]:
    """(the trained weights' evaluation metrics, whether it ran now): the Trainer's own evaluation at the last step
    when there was one (every eval strategy evaluates at the end of training), the same weights; else one now."""
    last = next((e for e in reversed(trainer.state.log_history) if "eval_loss" in e), {})
    if last.get("step") == trainer.state.global_step:
        return {k: v for k, v in last.items() if k.startswith("eval_")}, False
    return trainer.evaluate(), True


def library_versions() -> dict[str, str]:
    return {name: version(name) for name in LIBRARIES}
