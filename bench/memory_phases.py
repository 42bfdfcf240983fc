"""Where a real run's memory goes: the process's resident memory, phase by phase, through the tool's own entry point.

    python bench/memory_phases.py                       # SmolLM2-135M-Instruct, the default form, 6 steps
    python bench/memory_phases.py --gradient_checkpointing --output bench/results/smollm2_memory_phases_gc.json

One in-process run of `train_with_preference_prompt.main` on the SmolLM2 pairs (`data/smollm2_pairs/`) at the
real-model issue's shape (batch 8, MAX_LENGTH 160), with a fresh cache, so every precompute runs. A thread
samples the RSS every 5 ms; the named steps of the run (loading, each precompute, the training steps, the
evaluations, the sample generations, saving) are wrapped so that each sample is charged to the innermost step
running (the outer steps see it too). Per step: RSS when it first began, its peak, the most one call rose above
the RSS at its own start, RSS when it last ended. On CPU, freed memory often stays in the process (the allocator
keeps it), so what a call rose is what it needs, and the level after it is what the next steps inherit. The
optimizer's step runs between the named steps. Also printed: the sizes that explain the peak (the weights,
one fp32 copy of the full logits of a step). Needs the smollm2 folder (`python scripts/get_model.py smollm2`).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
GIB = 2**30


class Phases:
    """RSS samples charged to the innermost named step running."""

    def __init__(self, interval: float = 0.005):
        self._process = psutil.Process()
        self._stack: list[str] = []
        self._lock = threading.Lock()
        self._interval = interval
        self._stop = threading.Event()
        self.rows: dict[str, dict] = {}
        self.peak = 0
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _row(self, name: str) -> dict:
        return self.rows.setdefault(
            name, {"calls": 0, "seconds": 0.0, "entry": None, "peak": 0, "exit": None, "most_above_entry": 0}
        )

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            rss = self._process.memory_info().rss
            with self._lock:
                self.peak = max(self.peak, rss)
                row = self._row(self._stack[-1][0] if self._stack else "(between named steps)")
                row["peak"] = max(row["peak"], rss)
                for frame in self._stack:  # every step running, the outer ones too
                    frame[2] = max(frame[2], rss)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def wrap(self, owner, attribute: str, name: str) -> None:
        original = getattr(owner, attribute)

        @functools.wraps(original)
        def wrapped(*args, **kwargs):
            rss = self._process.memory_info().rss
            with self._lock:
                row = self._row(name)
                row["calls"] += 1
                row["entry"] = rss if row["entry"] is None else row["entry"]
                row["peak"] = max(row["peak"], rss)
                frame = [name, rss, rss]  # name, RSS at this call's start, its peak
                self._stack.append(frame)
            started = time.monotonic()
            try:
                return original(*args, **kwargs)
            finally:
                rss = self._process.memory_info().rss
                with self._lock:
                    self._stack.pop()
                    frame[2] = max(frame[2], rss)
                    row["seconds"] += time.monotonic() - started
                    row["exit"] = rss
                    row["peak"] = max(row["peak"], rss)
                    row["most_above_entry"] = max(row["most_above_entry"], frame[2] - frame[1])

        setattr(owner, attribute, wrapped)


def instrument(phases: Phases) -> None:
    """The run's named steps, innermost last: a precompute inside building the trainer is charged to itself."""
    from preference_dpo import pipeline, report
    from preference_dpo.trainer import PreferenceGuidedDPOTrainer as Trainer

    for attribute, name in (
        ("tokenize", "tokenize the pairs"),
        ("load_models", "load the model"),
        ("build_trainer", "build the trainer (other set-up)"),
        ("save_outputs", "save the adapter and outputs"),
    ):
        phases.wrap(pipeline, attribute, name)
    for attribute, name in (
        ("_precompute_ref_logps", "precompute: reference log-probs"),
        ("precompute_reference_guided", "precompute: reference, instructed view"),
        ("precompute_topk_teacher", "precompute: top-K teacher"),
        ("training_step", "training step (forward and backward)"),
        ("evaluate", "evaluation (held-out pairs)"),
        ("prediction_step", "evaluation: one batch"),
        ("generate_answers", "on-policy generations"),
    ):
        phases.wrap(Trainer, attribute, name)
    phases.wrap(Trainer, "_maybe_log_save_evaluate", "between steps: log, evaluate, save")
    phases.wrap(report.SampleGenerations, "on_evaluate", "sample generations and their gap")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=160)
    parser.add_argument("--align_loss", default="", help="Empty: the tool's default form.")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="GRADIENT_CHECKPOINTING=true.")
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "smollm2_memory_phases.json")
    args = parser.parse_args(argv)

    import torch

    from preference_dpo.presets import resolve
    from train_with_preference_prompt import main as tool

    model_dir = resolve("smollm2")
    config = json.loads((Path(model_dir) / "config.json").read_text())
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        settings = {
            "model_name_or_path": model_dir,
            "train_dataset_path": REPO / "data" / "smollm2_pairs" / "train.jsonl",
            "test_dataset_path": REPO / "data" / "smollm2_pairs" / "test.jsonl",
            "preference_text": "Answer in French.",
            **({"align_loss": args.align_loss} if args.align_loss else {}),
            "gradient_checkpointing": str(args.gradient_checkpointing).lower(),
            "per_device_train_batch_size": args.batch, "per_device_eval_batch_size": args.batch,
            "max_length": args.max_length, "max_prompt_length": 64, "max_steps": args.steps,
            "eval_steps": args.steps, "logging_steps": args.steps, "save_strategy": "no", "report_to": "none",
            "output_dir": work / "adapter", "log_dir": work / "tensorboard", "cache_dir": work / "cache",
            "overwrite": "true", "resume_from_checkpoint": "false", "disable_tqdm": "true",
        }  # fmt: skip
        argv = [item for key, value in settings.items() for item in (f"--{key}", str(value))]
        with Phases() as phases:
            instrument(phases)
            captured = io.StringIO()
            with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(captured):
                status = tool(argv)
        if status != 0:
            sys.stderr.write(captured.getvalue()[-3000:])
            return status
        trainable = None  # the adapter's parameters, from the saved file
        adapter = work / "adapter" / "adapter_model.safetensors"
        if adapter.exists():
            trainable = adapter.stat().st_size

    tokens = 2 * args.batch * args.max_length  # chosen and rejected rows of one step
    sizes = {
        "weights (fp32)": sum(_parameter_count(config).values()) * 4,
        "one fp32 copy of a step's full logits": tokens * config["vocab_size"] * 4,
        "adapter (LoRA, as saved)": trainable or 0,
    }
    lines = [
        f"SmolLM2-135M-Instruct, {args.align_loss or 'the default form'}, {args.steps} steps, batch {args.batch} "
        f"pairs x {args.max_length} tokens, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; process peak {phases.peak / GIB:.2f} GiB",
        "| step of the run | calls | s | RSS at first start (GiB) | peak (GiB) | most one call rose (GiB) "
        "| RSS after the last (GiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in phases.rows.items():
        if row["entry"] is None:  # the time between named steps
            lines.append(f"| {name} | | | | {row['peak'] / GIB:.2f} | | |")
            continue
        lines.append(
            f"| {name} | {row['calls']} | {row['seconds']:.1f} | {row['entry'] / GIB:.2f} | {row['peak'] / GIB:.2f} "
            f"| {row['most_above_entry'] / GIB:+.2f} | {row['exit'] / GIB:.2f} |"
        )
    lines += [f"{name}: {size / GIB:.2f} GiB" for name, size in sizes.items()]
    print("\n".join(lines))  # noqa: T201 - the benchmark's report
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "settings": {k: v for k, v in vars(args).items() if k != "output"}, "peak": phases.peak,
        "phases": phases.rows, "sizes": sizes, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }, indent=1) + "\n")  # fmt: skip
    return 0


def _parameter_count(config: dict) -> dict[str, int]:
    """Parameters of a Llama-family config with tied embeddings, by part."""
    h, i, layers, vocab = (
        config["hidden_size"],
        config["intermediate_size"],
        config["num_hidden_layers"],
        config["vocab_size"],
    )
    kv = h // config["num_attention_heads"] * config.get("num_key_value_heads", config["num_attention_heads"])
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return {"embeddings": vocab * h, "layers": layers * per_layer, "norm": h}


if __name__ == "__main__":
    sys.exit(main())
