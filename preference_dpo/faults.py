"""What both training stages (DPO, ptune) do about faults, written once: signals, NaN/Inf losses, resume, OVERWRITE.

- A signal (SIGTERM, SIGINT) stops every rank at the same micro-batch (`StopOnSignal`: the ranks agree),
  one checkpoint is saved, and the stage ends with `TrainingInterrupted` (exit status 128 + the signal):
  `train` and `end_if_stopped`.
- A NaN/Inf loss on any rank stops every rank with `NonFiniteLossError`, naming the step and the last
  good checkpoint, or, with SKIP_NONFINITE_BATCHES, skips the batch and counts it (`FaultTolerantTrainer`,
  which also marks each checkpoint complete once it is written).
- At start, OVERWRITE clears the previous run and otherwise the newest complete checkpoint is resumed
  (`starting_checkpoint`); the folder work is done by the global main process alone (the output folder
  is on storage every node shares).

What a stage has of its own (which files make a finished run, what its loss is made of) comes in as arguments.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import TrainerCallback

from .checkpoints import last_complete_checkpoint, mark_complete, resolve_resume
from .errors import NonFiniteLossError, TrainingInterrupted

logger = logging.getLogger(__name__)


# --- start: OVERWRITE or resume ----------------------------------------------------------------------------------


def on_main_process(compute: Callable[[], Any], args) -> Any:
    """`compute()` run by the global main process alone, its result sent to every rank; if it raises, every rank
    raises it (a copy on the others), so no rank is left waiting in a collective that the main process never
    reaches (a barrier passed by a failing main process would strand the others in the next collective)."""
    if args.world_size == 1:
        return compute()
    from accelerate.utils import broadcast_object_list

    outcome: list[Any] = [None]
    if args.process_index == 0:
        try:
            outcome = [(True, compute())]
        except Exception as e:  # sent on as it is: every rank ends with the main process's error
            outcome = [(False, e)]
    broadcast_object_list(outcome, from_process=0)
    succeeded, value = outcome[0]
    if not succeeded:
        raise value
    return value


def starting_checkpoint(args, clear_previous: Callable[[], None], settings: dict | None = None) -> str | None:
    """The checkpoint training resumes from (None: from the start), per RESUME_FROM_CHECKPOINT and OVERWRITE.

    OVERWRITE calls `clear_previous` (the stage's own files, checkpoints, event files) on the global main
    process alone, which also resolves the checkpoint; the others wait for its answer (or its error). Not per node
    (`main_process_first(local=True)`): on shared storage every node's main process would remove the same
    folders at once. A resumed run skips the evaluation before training: its history has it.
    """

    def decide() -> str | None:
        if args.overwrite:
            clear_previous()
            return None
        return resolve_resume(args.resume_from_checkpoint, args.output_dir, remove_incomplete=True, settings=settings)

    resume_from = on_main_process(decide, args)
    if resume_from is not None:
        args.eval_on_start = False
    return resume_from


def leave_process_group(finished: bool) -> None:
    """Leave the process group before the interpreter shuts down, on every way out of a run. Left to exit,
    gloo's worker threads can outlive the interpreter and abort the process in C++ ("terminate called without
    an active exception": status 250, or SIGABRT) after a complete run or a clean error.

    After a run every rank `finished`, the ranks leave together (a barrier first: one that left early made the
    others abort). After an error none waits, since a rank-local error never reaches its peers: gloo's group is
    freed locally; NCCL's is left to the launcher, as destroying it needs every rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if finished:
        dist.barrier()
    elif dist.get_backend() != "gloo":
        return
    dist.destroy_process_group()


# --- during training: NaN/Inf losses, complete checkpoints ---------------------------------------------------------


class FaultTolerantTrainer:
    """Mixed into a stage's `Trainer` subclass (before it): complete-or-ignored checkpoints, NaN/Inf handling."""

    nonfinite_batches_skipped = 0  # this process's count of batches skipped with SKIP_NONFINITE_BATCHES
    # what each checkpoint records of the run (`checkpoints.resume_settings`), set by the stage from its settings
    # as parsed, before the trainer could adjust any (None: nothing recorded, so a resume checks nothing)
    recorded_settings: dict | None = None

    def _finite_or_skipped(self, loss: torch.Tensor, what: Callable[[], str], advice: str) -> torch.Tensor:
        """`loss` when it is finite on every rank (a gather: all ranks decide alike). Else, with
        `--skip_nonfinite_batches`, a zero that leaves every gradient untouched, counted in the metric
        `nonfinite_batches_skipped`; without it, `NonFiniteLossError`: "Step N: the <what()>; stopped, the last
        good checkpoint is ...", then `advice`. `what` is called only then (its `.item()`s would sync a GPU)."""
        finite = self.accelerator.gather(torch.isfinite(loss.detach()).float().reshape(1)).min().item() == 1.0
        if not finite and self.args.skip_nonfinite_batches:
            self.nonfinite_batches_skipped += 1
        if self.nonfinite_batches_skipped:
            # `log` averages each list over the window: one element holding the running total logs the total
            # (as TRL logs `num_tokens`), not the mean of 1, 2, 3 ...; every window from the first skip on.
            self._metrics["train"]["nonfinite_batches_skipped"] = [self.nonfinite_batches_skipped]
        if finite:
            return loss
        if self.args.skip_nonfinite_batches:
            return loss.new_zeros((), requires_grad=True)  # a fresh leaf: backward through it changes nothing
        last = last_complete_checkpoint(self.args.output_dir)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet"
        raise NonFiniteLossError(
            f"Step {self.state.global_step + 1}: the {what()}; stopped, {kept}. {advice}, or set "
            "SKIP_NONFINITE_BATCHES=true to skip such batches."
        )

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        # Written after every other file of the checkpoint: without it, resume ignores the folder.
        if self.args.should_save:
            mark_complete(
                f"{self._get_output_dir(trial=trial)}/checkpoint-{self.state.global_step}",
                self.recorded_settings,
            )
        self.accelerator.wait_for_everyone()


# --- signals -------------------------------------------------------------------------------------------------------


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
    `end_if_stopped` then ends the stage (exit status 128 + `stop_signal`), and rerunning the same command
    resumes.
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


def stop_on_signal(args) -> StopOnSignal:
    """The stage's signal handler, to pass to its trainer as a callback. A process started by DeepSpeed's launcher
    (which passes --local_rank, and forwards signals to the ranks) is `launched`."""
    return StopOnSignal(launched=args.local_rank != -1)


def train(trainer, stopper: StopOnSignal, resume_from: str | None) -> None:
    """`trainer.train`, and this process's signal handlers back as they were afterwards, whatever happens."""
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    finally:
        stopper.restore()


def end_if_stopped(trainer, stopper: StopOnSignal, output_dir, before_stop: Callable[[], None]) -> None:
    """After `train`: on a stop the ranks agreed on, `before_stop()` (close the TensorBoard writer) and
    `TrainingInterrupted`; every rank takes that branch together, none goes on into the final outputs' collectives.

    A signal that came after the last step stops nothing: the stage writes its outputs (and says so); so do
    the batches it skipped.
    """
    if stopper.stop_signal is not None:
        before_stop()
        step = trainer.state.global_step
        saved = (
            f"checkpoint-{step} in {output_dir} is complete. Rerun the same command to resume."
            if step
            else "no step had finished, nothing was saved. Rerun the same command to start again."
        )
        # No signal name: fast_train.sh passes a Ctrl-C on as SIGTERM (and says so), so this process's signal
        # need not be the one the user sent.
        raise TrainingInterrupted(stopper.stop_signal, f"Stopped by signal at step {step}; {saved}")
    if stopper.received is not None:
        logger.warning("The signal came after the last training step: finishing the run (final outputs).")
    if trainer.nonfinite_batches_skipped:
        logger.warning("Skipped %d batches with a NaN/Inf loss.", trainer.nonfinite_batches_skipped)
