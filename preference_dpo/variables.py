"""The launcher's variables and the flags they set: every error message names both (`describe`).

A module of its own, importing nothing of the package, so that any module can name a setting in its errors
(`config.py` parses the settings; `checkpoints.py`, `data.py` and the stages only describe them).
"""

from __future__ import annotations

# Launcher variable -> flag. Error messages name both; the README's table is checked against this one.
LAUNCHER_VARIABLES = {
    "POLICY_MODEL_PATH": "model_name_or_path",
    "REFERENCE_MODEL_PATH": "reference_model_path",
    "TRAIN_DATASET_PATH": "train_dataset_path",
    "TEST_DATASET_PATH": "test_dataset_path",
    "DATASET_SPLIT": "dataset_split",
    "TRAINING_MODE": "training_mode",
    "PREFERENCE_TEXT": "preference_text",
    "PREFERENCE_POSITION": "preference_position",
    "PROMPT_EMBEDDING_PATH": "prompt_embedding_path",
    "ALIGN_LOSS": "align_loss",
    "DISTILL_TOP_K": "distill_top_k",
    "DISTILL_REDUCTION": "distill_reduction",
    "DISTILL_ON_POLICY_FRAC": "distill_on_policy_frac",
    "BETA": "beta",
    "ALPHA": "aligned_loss_weight",
    "LEARNING_RATE": "learning_rate",
    "NUM_EPOCHS": "num_train_epochs",
    "MAX_STEPS": "max_steps",
    "PER_DEVICE_BATCH_SIZE": "per_device_train_batch_size",
    "GRADIENT_ACCUM_STEPS": "gradient_accumulation_steps",
    "LORA_R": "lora_r",
    "LORA_ALPHA": "lora_alpha",
    "LORA_DROPOUT": "lora_dropout",
    "LORA_TARGET_MODULES": "lora_target_modules",
    "MAX_LENGTH": "max_length",
    "MAX_PROMPT_LENGTH": "max_prompt_length",
    "PRECISION": "precision",
    "GRADIENT_CHECKPOINTING": "gradient_checkpointing",
    "SEED": "seed",
    "LOGGING_STEPS": "logging_steps",
    "EVAL_STEPS": "eval_steps",
    "SAVE_STEPS": "save_steps",
    "RESUME": "resume_from_checkpoint",
    "OVERWRITE": "overwrite",
    "SKIP_NONFINITE_BATCHES": "skip_nonfinite_batches",
    "MERGE_ADAPTER": "merge_adapter",
    "RUN_NAME": "run_name",
    "OUTPUT_DIR": "output_dir",
    "LOG_DIR": "log_dir",
    "STAGE": "stage",
    "NUM_VIRTUAL_TOKENS": "num_virtual_tokens",
    "PTUNE_OBJECTIVE": "ptune_objective",
    "PTUNE_INIT": "ptune_init",
    "PTUNE_ENCODER": "ptune_encoder",
    "PTUNE_LEARNING_RATE": "ptune_learning_rate",
    "PTUNE_EPOCHS": "ptune_epochs",
    "PTUNE_MAX_STEPS": "ptune_max_steps",
    "PTUNE_OUTPUT_DIR": "ptune_output_dir",
    "CACHE": "cache",
    "CACHE_DIR": "cache_dir",
    "NUM_SAMPLE_PROMPTS": "num_sample_prompts",
}
_FLAG_TO_VARIABLE = {flag: var for var, flag in LAUNCHER_VARIABLES.items()}


def describe(flag: str) -> str:
    """`ALPHA (--aligned_loss_weight)` for a flag the launcher sets, `--flag` otherwise."""
    variable = _FLAG_TO_VARIABLE.get(flag)
    return f"{variable} (--{flag})" if variable else f"--{flag}"
