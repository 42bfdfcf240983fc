#!/usr/bin/env python
"""Preference-guided DPO: TRL's DPO with LoRA, plus a loss that makes the model act, without the
preference instruction, as it does with it. Usually started by `fast_train.sh`.

    python train_with_preference_prompt.py --help
"""

from __future__ import annotations

import logging
import os
import sys


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


def main(argv: list[str] | None = None) -> int:
    # Heavy imports stay inside main() so that `--help` and bad-input errors come back quickly.
    from preference_dpo.config import parse_args
    from preference_dpo.errors import NonFiniteLossError, TrainingInterrupted, UserInputError

    level = logging.INFO if _is_main_process() else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    parsed = finished = False
    try:
        data_args, model_args, train_args = parse_args(argv)
        parsed = True
        import transformers

        # transformers' INFO level dumps every config it loads; its warnings and the progress bars stay.
        transformers.utils.logging.set_verbosity(logging.WARNING)
        if train_args.stage == "ptune":  # learn the soft prompt embedding mode reads
            from preference_dpo.ptune import run
        else:
            from preference_dpo.pipeline import run
        from preference_dpo.report import attach_log_file, log_settings

        # The full settings go to the log file (and run_config.json); the console gets a summary.
        attach_log_file(train_args.log_file, _is_main_process())
        log_settings(data_args, model_args, train_args)
        run(data_args, model_args, train_args)
        finished = True
    except UserInputError as e:
        # Every rank parses the same arguments: the main process alone says what is wrong with them. A later
        # problem may be one rank's own, so every rank reports those.
        if parsed or _is_main_process():
            for problem in e.problems:
                print(f"error: {problem}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"\nerror: {e}", file=sys.stderr)  # on a line of its own, after the progress bar
        return 3
    except TrainingInterrupted as e:
        print(f"\ninterrupted: {e}", file=sys.stderr)
        return e.exit_code
    finally:
        if "torch.distributed" in sys.modules:  # not for `--help` or an early error: nothing to leave
            from preference_dpo.faults import leave_process_group

            try:
                leave_process_group(finished)
            except Exception as e:  # the run's own outcome (its exit status) is what the user needs
                logging.getLogger(__name__).warning("Leaving the process group failed: %s", e)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
