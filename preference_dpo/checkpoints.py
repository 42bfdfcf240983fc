"""Surviving faults: complete-or-ignored checkpoints, resuming, final outputs, stopping on signals.

A checkpoint counts only once its `checkpoint_complete` marker exists: the marker is written after
every other file of the checkpoint, so a run killed mid-save leaves a folder without it, which resume
skips (and removes, saying so). A finished run is marked the same way by `run_config.json`, written last
into the output folder after the other final files have been moved in.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import time
from pathlib import Path

from transformers import TrainerCallback

from .config import describe
from .errors import UserInputError
from .metrics import remove_stage_event_files

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "checkpoint_complete"
RUN_CONFIG_NAME = "run_config.json"  # written last: its presence means the run finished
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def mark_complete(checkpoint_dir: str | os.PathLike) -> None:
    Path(checkpoint_dir, COMPLETE_MARKER).write_text("ok\n")


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
            f"{describe('overwrite')} to replace it, or choose another OUTPUT_DIR or RUN_NAME."
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


def resolve_resume(value: str | None, output_dir: str) -> str | None:
    """`true`/`auto`: the newest complete checkpoint in `output_dir` (or None); `false`: None; else a path."""
    text = "" if value is None else str(value).strip()
    if text.lower() in ("", "false", "no", "0", "none"):
        return None
    if text.lower() in ("auto", "true", "yes", "1"):
        last = last_complete_checkpoint(output_dir, remove_incomplete=True)
        if last is not None:
            logger.info("Resuming from %s", last)
        return None if last is None else str(last)
    if not (Path(text) / COMPLETE_MARKER).exists():
        raise UserInputError(
            f"{describe('resume_from_checkpoint')} {text!r} is not a complete checkpoint folder "
            f"(no {COMPLETE_MARKER} file in it)."
        )
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


class StopOnSignal(TrainerCallback):
    """SIGTERM / SIGINT: stop at the next micro-batch, on every rank together, and save one checkpoint.

    The handler only records the signal. At every micro-batch boundary the ranks all-reduce what they
    received, so all of them stop at the same one even when a single rank was signalled (a collective
    step or save with a rank missing would hang). Work on an unfinished step is dropped: the checkpoint
    is the last finished step's, written once, by all ranks (none when that step is already saved, or
    when no step finished). Checking per micro-batch keeps the stop short when a step has many of them.

    Launchers pass signals on, so one stop request can arrive more than once (a Ctrl-C reaches a rank
    from the terminal and again from DeepSpeed's launcher, which forwards SIGTERM to each rank in turn
    after the previous one exits). Copies never hurry the stop. A process started by a launcher
    (`launched`) never stops on a later signal: its launcher kills it (DeepSpeed after 30 s,
    fast_train.sh on a second signal). A lone process stops at once (KeyboardInterrupt, nothing saved) on
    a signal that comes more than `second_signal_after_s` after the first.
    The pipeline then exits with 128 + `stop_signal`, and rerunning the same command resumes.
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT), launched: bool = False, second_signal_after_s=2.0):
        self.received: int | None = None  # the first signal this process got
        self.stop_signal: int | None = None  # the signal all ranks agreed to stop on
        self._received_at = 0.0
        self._launched = launched
        self._second_after = second_signal_after_s
        self._saved_step = 0  # nothing to save at step 0
        self._micro_batches = 0
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        now = time.monotonic()
        if self.received is None:
            self.received, self._received_at = signum, now
            logger.warning(
                "Received %s: stopping after this micro-batch and saving a checkpoint.", signal.Signals(signum).name
            )
        elif not self._launched and now - self._received_at > self._second_after:
            raise KeyboardInterrupt  # a second request: stop now

    def _agreed_signal(self, args) -> int | None:
        """The largest signal number any rank received (an all-reduce), None if none did."""
        import torch
        import torch.distributed as dist

        received = self.received or 0
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([received], dtype=torch.int64, device=args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            received = int(flag.item())
        return received or None

    def _stop_if_signalled(self, args, state, control, within_step: bool):
        if self.stop_signal is None:
            self.stop_signal = self._agreed_signal(args)
            if self.stop_signal is None:
                return control
            step = state.global_step
            if state.is_world_process_zero:
                where = f"during step {step + 1}, after micro-batch {self._micro_batches}" if within_step else ""
                saving = (
                    "no step has finished, nothing to save"
                    if step == 0
                    else f"checkpoint-{step} exists already"
                    if step == self._saved_step
                    else f"saving checkpoint-{step}"
                )
                name = signal.Signals(self.stop_signal).name
                logger.warning("Stopping on %s %s; %s.", name, where or f"after step {step}", saving)
        control.should_training_stop = True
        control.should_evaluate = False
        control.should_save = control.should_save or state.global_step != self._saved_step
        return control

    def on_train_begin(self, args, state, control, **kwargs):
        self._saved_step = state.global_step  # resumed: that checkpoint exists
        return control

    def on_step_begin(self, args, state, control, **kwargs):
        self._micro_batches = 0
        return control

    def on_substep_end(self, args, state, control, **kwargs):
        self._micro_batches += 1
        return self._stop_if_signalled(args, state, control, within_step=True)

    def on_step_end(self, args, state, control, **kwargs):
        return self._stop_if_signalled(args, state, control, within_step=False)

    def on_save(self, args, state, control, **kwargs):
        self._saved_step = state.global_step
        return control

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
