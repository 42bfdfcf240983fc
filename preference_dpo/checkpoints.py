"""The output folder on disk: complete-or-ignored checkpoints, finished runs, the checkpoint to resume from.

A checkpoint counts only once its `checkpoint_complete` marker exists: the marker is written after
every other file of the checkpoint, so a run killed mid-save leaves a folder without it, which resume
skips (and removes, saying so). A finished run is marked the same way by `run_config.json`, written last
into the output folder after the other final files have been moved in. What a running stage does with
these (signals, NaN losses, resume or OVERWRITE at start) is in `faults.py`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from .errors import UserInputError
from .metrics import remove_stage_event_files
from .variables import describe

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "checkpoint_complete"
RUN_CONFIG_NAME = "run_config.json"  # written last: its presence means the run finished
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


# The settings that decide what a stage trains, and how: a resumed run must use the checkpoint's, since the optimizer
# and the learning-rate schedule come back from the checkpoint while run_config.json would record the new ones. Not
# among them: how the batch is split (PER_DEVICE_BATCH_SIZE x GRADIENT_ACCUM_STEPS; their product is, as
# `global_batch`), so that a run out of memory can resume with a smaller micro-batch; and the step count (MAX_STEPS,
# NUM_EPOCHS), which a resume may extend (the schedule is then planned again from the step reached).
RESUME_SETTINGS = (
    "stage", "training_mode", "preference_text", "preference_position", "prompt_embedding_path", "align_loss",
    "aligned_loss_weight", "distill_top_k", "distill_reduction", "distill_on_policy_frac", "beta", "loss_type",
    "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "max_length", "max_prompt_length", "seed",
    "num_virtual_tokens", "ptune_objective", "ptune_init", "ptune_encoder", "ptune_learning_rate",
)  # fmt: skip
MODEL_SETTINGS = (
    "model_name_or_path", "model_revision", "reference_model_path", "use_peft", "lora_r", "lora_alpha",
    "lora_dropout", "lora_target_modules",
)  # fmt: skip
DATA_SETTINGS = ("train_dataset_path", "dataset_split")
_DESCRIBED = {"global_batch": "the global batch (ranks x PER_DEVICE_BATCH_SIZE x GRADIENT_ACCUM_STEPS)",
              "ranks": "the number of ranks", "precision": "PRECISION (resolved)"}  # fmt: skip


def resume_settings(args, model_args=None, data_args=None) -> dict:
    """What a checkpoint records of its run (RESUME_SETTINGS of `args`, the model's and the data's), as JSON reads
    it back; ranks and precision as resolved (PRECISION=auto is fp32 on a CPU, as PRECISION=fp32 is)."""
    settings = {name: getattr(args, name, None) for name in RESUME_SETTINGS}
    for source, names in ((model_args, MODEL_SETTINGS), (data_args, DATA_SETTINGS)):
        settings.update({name: getattr(source, name, None) for name in names} if source is not None else {})
    ranks = args.world_size
    settings.update(
        global_batch=ranks * args.per_device_train_batch_size * args.gradient_accumulation_steps,
        ranks=ranks,  # DeepSpeed's checkpoints are sharded per rank; one process's are not
        precision="bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
    )
    return json.loads(json.dumps(settings, default=str))


def mark_complete(checkpoint_dir: str | os.PathLike, settings: dict | None = None) -> None:
    """Written last into a checkpoint: the settings it was trained with (`resume_settings`), as JSON."""
    Path(checkpoint_dir, COMPLETE_MARKER).write_text(json.dumps(settings or {}, indent=1) + "\n")


def check_resume_settings(checkpoint: str | os.PathLike, settings: dict) -> None:
    """`UserInputError` naming each setting this run changes from the checkpoint's (a marker written before the
    settings were recorded, `ok`, checks nothing)."""
    try:
        saved = json.loads(Path(checkpoint, COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return
    changed = [name for name in settings if name in saved and saved[name] != settings[name]]
    if changed:
        given = "; ".join(
            f"{_DESCRIBED.get(name) or describe(name)} {saved[name]!r} there, {settings[name]!r} now"
            for name in changed
        )
        raise UserInputError(
            f"{describe('resume_from_checkpoint')}: {checkpoint} was trained with other settings ({given}): rerun "
            f"with the checkpoint's, or start afresh with {describe('overwrite')}=true (or another RUN_NAME)."
        )


def checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, folder) of every `checkpoint-<step>` folder, oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return sorted(found)


def last_complete_checkpoint(output_dir: str | os.PathLike, remove_incomplete: bool = False) -> Path | None:
    """The newest checkpoint with its completion marker; incomplete ones are reported (and removed)."""
    last = None
    for _, path in checkpoints(output_dir):
        if (path / COMPLETE_MARKER).exists():
            last = path
            continue
        logger.warning("%s was not saved completely (the run was killed while saving): skipped.", path)
        if remove_incomplete:
            shutil.rmtree(path)
    return last


def is_finished_run(output_dir: str | os.PathLike) -> bool:
    return Path(output_dir, RUN_CONFIG_NAME).is_file()


def check_output_dir(output_dir: str, overwrite: bool) -> list[str]:
    """Problems with writing into `output_dir`: a finished run there is kept unless OVERWRITE asks."""
    if is_finished_run(output_dir) and not overwrite:
        return [
            f"{describe('output_dir')} {output_dir!r} already holds a finished run ({RUN_CONFIG_NAME}); set "
            f"{describe('overwrite')}=true to replace it, or choose another OUTPUT_DIR or RUN_NAME."
        ]
    return []


def clear_previous_run(output_dir: str, log_dir: str | None = None) -> None:
    """OVERWRITE: drop the old run's completion marker and checkpoints, so none of it is resumed or kept, and
    its TensorBoard event files in `log_dir` (the DPO stage's; the ptune stage's are that stage's to replace)."""
    folder = Path(output_dir)
    replaced = []
    if is_finished_run(folder):
        (folder / RUN_CONFIG_NAME).unlink()
        replaced.append("a finished run")
    found = checkpoints(folder)
    for _, path in found:
        shutil.rmtree(path)
    if found:
        replaced.append(f"{len(found)} checkpoint(s)")
    if replaced:  # an empty or new folder has nothing to replace: no warning
        logger.warning("OVERWRITE: replacing the previous run in %s (%s)", folder, " and ".join(replaced))
    removed = remove_stage_event_files(log_dir) if log_dir else []
    if removed:
        logger.warning(
            "OVERWRITE: removed the previous run's TensorBoard event file(s) from %s: %s", log_dir, ", ".join(removed)
        )


def resolve_resume(
    value: str | None, output_dir: str, remove_incomplete: bool = True, settings: dict | None = None
) -> str | None:
    """`true`/`auto`: the newest complete checkpoint in `output_dir` (or None), incomplete ones removed
    (`remove_incomplete`); `false`: None, refused while `output_dir` holds checkpoints (a later resume would take
    the earlier run's); else a path. A checkpoint trained with other `settings` is refused."""
    text = "" if value is None else str(value).strip()
    if text.lower() in ("", "false", "no", "0", "none"):
        if found := checkpoints(output_dir):
            raise UserInputError(
                f"{describe('resume_from_checkpoint')}=false, but {output_dir} holds {len(found)} checkpoint(s) of an "
                f"earlier run, which a later resume would take: set {describe('overwrite')}=true to replace them, or "
                "choose another OUTPUT_DIR or RUN_NAME."
            )
        return None
    if text.lower() in ("auto", "true", "yes", "1"):
        last = last_complete_checkpoint(output_dir, remove_incomplete=remove_incomplete)
        if last is not None:
            if settings is not None:
                check_resume_settings(last, settings)
            logger.info("Resuming from %s", last)
        return None if last is None else str(last)
    if not (Path(text) / COMPLETE_MARKER).exists():
        raise UserInputError(
            f"{describe('resume_from_checkpoint')} {text!r} is not a complete checkpoint folder "
            f"(no {COMPLETE_MARKER} file in it)."
        )
    if settings is not None:
        check_resume_settings(text, settings)
    return text


def move_into(staging: Path, output_dir: Path, last: str) -> None:
    """Move every file of `staging` into `output_dir` (replacing), the file named `last` at the end."""
    names = sorted(os.listdir(staging), key=lambda name: name == last)
    for name in names:
        target = output_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(staging / name, target)
    staging.rmdir()
