"""The real-model benchmark: on SmolLM2-135M-Instruct, does the instruction's effect carry over, and at what cost?

    python -m bench.realmodel.run                 # from the repository root; CPU, all arms, 3 seeds
    python -m bench.realmodel.run --seeds 0       # one seed
    python -m bench.realmodel.run --quick         # 2 steps of 2 arms on a few questions: a smoke test

The model is `POLICY_MODEL_PATH=smollm2` (built once from the package index, `preference_dpo/presets.py`); the
pairs are `data/smollm2_pairs/` (brevity: chosen = the first sentence of the model's own answer, rejected = the
whole answer; `bench/realmodel/pairs.py`), whose contrast has nothing to do with either instruction:

- "Answer in French." (system position), detected by `detectors.is_french`;
- "Start your answer with 'Hello!'" (user position: in the system position the model ignores it), detected by
  an opening "Hello".

Arms (`ARMS`), each trained through the tool's own entry point on the same pairs, steps and LoRA settings:
plain DPO (`ALPHA=0`, the instruction plays no part, so one run serves both instructions) at three learning
rates; the guide's `hinge` at ALPHA 0.1 and `ref_distill` (top-16, `sequence_sum`, ALPHA 1) at two learning
rates, once per instruction. Every arm runs once per seed (LoRA initialisation, data order, sampling).

Measures (`measure.py`), on 40 held-out questions WITHOUT the instruction: the share of greedy and of sampled
answers each detector flags, turned into the transfer ratio (after - base) / (instructed base - base); the
pairs' trait (one-sentence answers); the capitals the model names (30 questions), beside the base model's
with and without the instruction; the per-token log-prob of the instructed base model's answers.

Writes `bench/realmodel/results.json` and the real-model section of METHOD_RESULTS.md. Finished runs are
kept in `bench/realmodel/work/` and skipped on a rerun while the sources are unchanged (`--fresh`: start
over).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import multiprocessing
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
RESULTS_JSON = HERE / "results.json"
REPORT = REPO / "METHOD_RESULTS.md"
DATA = REPO / "data" / "smollm2_pairs"
START, END = "<!-- realmodel:start -->", "<!-- realmodel:end -->"

logger = logging.getLogger("bench.realmodel")


@dataclass(frozen=True)
class Arm:
    name: str
    align_loss: str = "hinge"
    alpha: float = 0.0
    learning_rate: float = 5e-4
    distill_top_k: int | None = None
    flags: tuple[tuple[str, str], ...] = ()  # any other settings of the arm, (flag, value)

    @property
    def is_dpo(self) -> bool:
        return self.alpha == 0.0


ARMS = (
    Arm("dpo lr1e-4", learning_rate=1e-4),
    Arm("dpo lr2e-4", learning_rate=2e-4),
    Arm("dpo lr5e-4", learning_rate=5e-4),
    Arm("hinge a=0.1 lr5e-4", "hinge", 0.1, 5e-4),
    Arm("ref_distill top16 sum a=1 lr2e-4", "ref_distill", 1.0, 2e-4, 16),
    Arm("ref_distill top16 sum a=1 lr5e-4", "ref_distill", 1.0, 5e-4, 16),
    # on the policy's own answers, every step, sampled at temperature 1 (ALIGN_LOSS=onpolicy_distill)
    Arm("onpolicy_distill rkl a=1 lr5e-4", "onpolicy_distill", 1.0, 5e-4),
    # on the frozen reference's own greedy answers WITH the instruction, precomputed (ALIGN_LOSS=context_distill)
    Arm("context_distill a=1 lr5e-4", "context_distill", 1.0, 5e-4),
)
QUICK_ARMS = ("dpo lr5e-4", "ref_distill top16 sum a=1 lr5e-4")
# The DEMO=smollm2 settings but 1 epoch of the 88 pairs = 11 steps (the demo runs 2; --epochs 2 for those), the tool's
# defaults otherwise (BETA 0.05, LoRA r16 on all linear layers, dropout 0.1).
TRAINING = {
    "per_device_train_batch_size": 8, "max_length": 128, "max_prompt_length": 64,
    "logging_steps": 11, "num_sample_prompts": 0, "save_strategy": "no", "report_to": "none", "disable_tqdm": "true",
}  # fmt: skip
MAX_NEW_TOKENS = 48
TARGET = {"transfer_mean": 0.8, "transfer_each_seed": 0.6, "facts_below_instructed": 0.05}


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr, force=True)
    logging.getLogger("transformers").setLevel(logging.WARNING)


def _one_thread() -> None:
    """One thread per worker: two runs side by side use the two cores better than one run on both (the
    batches are small), and a thread's result does not depend on another's load."""
    import torch

    torch.set_num_threads(1)
    _configure_logging()


SOURCES = ("measure.py", "detectors.py", "pairs.py")  # what a result depends on, besides its unit's settings


def _digest(*parts) -> str:
    digest = hashlib.sha256()
    for path in [*(HERE / name for name in SOURCES), *sorted(DATA.glob("*.jsonl"))]:
        digest.update(path.read_bytes())
    digest.update(json.dumps([MAX_NEW_TOKENS, *parts], sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def base_key(quick: bool) -> str:
    """What the base model's measures are reused on: the measuring code, the questions and the pairs."""
    return _digest("base", quick)


def unit_key(arm: Arm, instruction: str | None, seed: int, epochs: int, quick: bool) -> str:
    """What a finished run is reused on: the measuring code, the pairs, the training settings and the unit's own
    (arm, instruction, seed, epochs). Not the tool's sources: a refactoring would rerun every arm (each result
    records the commit it ran on); nor the list of arms, so adding one reruns nothing else."""
    return _digest(TRAINING, dataclasses.asdict(arm), instruction, seed, epochs, quick)


def commit() -> str:
    import subprocess

    run = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "preference_dpo"], capture_output=True,
                           text=True).stdout.strip()  # fmt: skip
    return (run.stdout.strip() or "unknown") + ("+changes" if dirty else "")


def held_out_questions() -> list[str]:
    from bench.realmodel.pairs import questions

    return questions("test")


def _run_tool(settings: dict, what: str, console: Path) -> None:
    """The tool's own entry point, its console captured into `console` (and shown if it fails)."""
    from train_with_preference_prompt import main

    argv = [item for key, value in settings.items() for item in (f"--{key}", str(value))]
    captured = io.StringIO()
    with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(captured):
        status = main(argv)
    _configure_logging()  # main() points the root logger at the captured stream
    console.write_text(captured.getvalue(), encoding="utf-8")
    if status != 0:
        raise RuntimeError(f"{what} failed ({status}): {captured.getvalue()[-3000:]}")


def measure_base(model_dir: Path, questions: list[str], quick: bool) -> dict:
    """The base model without and with each instruction, and the instructed answers the trained models are
    scored on."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.realmodel import measure

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    new_tokens = 16 if quick else MAX_NEW_TOKENS
    reference = {
        name: measure.generate(model, tokenizer, measure.chat_texts(tokenizer, questions, instruction), new_tokens)
        for name, instruction in measure.INSTRUCTIONS.items()
    }  # fmt: skip
    without = measure.measure(model, tokenizer, questions, reference, 0, new_tokens)
    with_instruction = {
        name: dataclasses.asdict(measure.measure(model, tokenizer, questions, reference, 0, new_tokens, instruction))
        for name, instruction in measure.INSTRUCTIONS.items()
    }  # fmt: skip
    return {"without": dataclasses.asdict(without), "with": with_instruction, "reference_answers": reference}


def train_and_measure(unit: dict) -> dict:
    """One arm, one instruction (None: plain DPO), one seed: train through the tool, then measure without the
    instruction. Runs in a worker process."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.realmodel import measure

    arm = Arm(**unit["arm"])
    folder = Path(unit["folder"])
    instruction = measure.INSTRUCTIONS[unit["instruction"]] if unit["instruction"] else measure.INSTRUCTIONS["french"]
    settings = {
        **TRAINING,
        "num_train_epochs": unit["epochs"],
        "model_name_or_path": unit["model_dir"],
        "train_dataset_path": DATA / "train.jsonl",
        "test_dataset_path": "",
        "preference_text": instruction.text,
        "preference_position": instruction.position,
        "align_loss": arm.align_loss,
        "aligned_loss_weight": arm.alpha,
        **({"distill_top_k": arm.distill_top_k, "distill_reduction": "sequence_sum"} if arm.distill_top_k else {}),
        "learning_rate": arm.learning_rate,
        **dict(arm.flags),
        "seed": unit["seed"],
        "output_dir": folder / "adapter",
        "log_dir": folder / "tensorboard",
        "cache_dir": unit["cache"],
        "overwrite": "true",
        "resume_from_checkpoint": "false",
        **({"max_steps": 2} if unit["quick"] else {}),
    }
    started = time.monotonic()
    _run_tool(settings, f"{arm.name} {unit['instruction'] or ''} seed {unit['seed']}", folder / "console.log")
    trained = time.monotonic() - started
    tokenizer = AutoTokenizer.from_pretrained(unit["model_dir"])
    base = AutoModelForCausalLM.from_pretrained(unit["model_dir"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, folder / "adapter").merge_and_unload().eval()
    history = json.loads((folder / "adapter" / "trainer_state.json").read_text())["log_history"]
    logged = [e for e in history if "logps/chosen" in e]
    result = {
        "arm": arm.name, "instruction": unit["instruction"], "seed": unit["seed"], "train_seconds": trained,
        "commit": unit["commit"], "steps": json.loads((folder / "adapter" / "trainer_state.json").read_text())["global_step"],
        "logps_chosen_first": logged[0]["logps/chosen"] if logged else None,
        "logps_chosen_last": logged[-1]["logps/chosen"] if logged else None,
        **dataclasses.asdict(measure.measure(model, tokenizer, unit["questions"], unit["reference_answers"],
                                             unit["seed"], 16 if unit["quick"] else MAX_NEW_TOKENS)),
        "measure_seconds": time.monotonic() - started - trained,
    }  # fmt: skip
    (folder / "result.json").write_text(json.dumps({**result, "fingerprint": unit["fingerprint"]}, indent=1))
    return result


def unit_folder(work: Path, arm: Arm, instruction: str | None, seed: int) -> Path:
    return work / f"{arm.name.replace(' ', '_')}_{instruction or 'dpo'}_seed{seed}"


def finished(folder: Path, key: str) -> dict | None:
    """The run's result if it finished with these settings."""
    done = folder / "result.json"
    if not done.exists():
        return None
    result = json.loads(done.read_text())
    return result if result.get("fingerprint") == key else None


def restore_reported_runs(work: Path) -> int:
    """Put the runs that results.json reports back into `work` where it lacks them, with the base model's
    measures: a clean checkout (or another machine) then reruns only what changed or is missing, and the report
    keeps the runs an invocation with fewer arms, instructions or seeds did not train. Each run keeps its key
    (`fingerprint`), so one whose measuring code, pairs or settings changed since is not reused."""
    if not RESULTS_JSON.exists():
        return 0
    reported = json.loads(RESULTS_JSON.read_text())
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "base.json").exists() and "fingerprint" in reported["base"]:
        (work / "base.json").write_text(json.dumps(reported["base"], indent=1, ensure_ascii=False))
    arms = {arm.name: arm for arm in ARMS}
    restored = 0
    for result in reported["runs"]:
        if result["arm"] not in arms:
            continue
        folder = unit_folder(work, arms[result["arm"]], result["instruction"], result["seed"])
        if not (folder / "result.json").exists():
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "result.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
            restored += 1
    return restored


def units(arms, instructions, seeds) -> list[tuple[Arm, str | None, int]]:
    out = []
    for seed in seeds:
        for arm in arms:
            for name in [None] if arm.is_dpo else instructions:
                out.append((arm, name, seed))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=None, help="arm names (default: all of ARMS)")
    parser.add_argument("--instructions", nargs="+", default=None, help="default: french hello")
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)), help="runs side by side")
    parser.add_argument("--quick", action="store_true", help="2 steps, 2 arms, 1 seed, 6 questions; no report")
    parser.add_argument("--fresh", action="store_true", help="rerun every arm")
    parser.add_argument("--epochs", type=int, default=1, help="epochs of the 88 pairs (11 steps each)")
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--model", default="smollm2", help="a folder, or smollm2 (built once)")
    args = parser.parse_args(argv)
    _configure_logging()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the workers (spawned: fresh interpreters)

    from bench.realmodel import measure
    from preference_dpo.presets import resolve

    model_dir = resolve(args.model, "--model")
    instructions = args.instructions or list(measure.INSTRUCTIONS)
    arm_names = args.arms or ([*QUICK_ARMS] if args.quick else [a.name for a in ARMS])
    arms = [a for a in ARMS if a.name in arm_names]
    seeds = [0] if args.quick else args.seeds
    questions = held_out_questions()[:6] if args.quick else held_out_questions()
    if args.quick:
        instructions = instructions[:1]
    head = commit()
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    if not args.fresh and not args.quick:
        restored = restore_reported_runs(args.work)
        if restored:
            logger.info("Restored %d finished runs from %s (same measuring code, pairs and settings)", restored,
                        RESULTS_JSON.relative_to(REPO))  # fmt: skip
    base_file = args.work / "base.json"
    base = json.loads(base_file.read_text()) if base_file.exists() else {}
    if args.fresh or base.get("fingerprint") != base_key(args.quick):
        _one_thread()
        logger.info("Measuring the base model with and without each instruction ...")
        base = {**measure_base(model_dir, questions, args.quick), "fingerprint": base_key(args.quick)}
        base_file.write_text(json.dumps(base, indent=1, ensure_ascii=False))

    todo, reused = [], 0
    for arm, instruction, seed in units(arms, instructions, seeds):
        folder, key = unit_folder(args.work, arm, instruction, seed), unit_key(arm, instruction, seed, args.epochs,
                                                                                args.quick)  # fmt: skip
        if not args.fresh and finished(folder, key) is not None:
            reused += 1
            continue
        todo.append({"arm": dataclasses.asdict(arm), "instruction": instruction, "seed": seed, "folder": str(folder),
                     "model_dir": str(model_dir), "cache": str(args.work / "cache"), "quick": args.quick,
                     "questions": questions, "reference_answers": base["reference_answers"], "fingerprint": key,
                     "epochs": args.epochs, "commit": head})  # fmt: skip
    logger.info("%d runs to train (%d reused), %d at a time", len(todo), reused, args.jobs)
    context = multiprocessing.get_context("spawn")  # torch and fork do not mix
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context, initializer=_one_thread) as pool:
        for future in concurrent.futures.as_completed([pool.submit(train_and_measure, u) for u in todo]):
            result = future.result()
            logger.info("%s %s seed %d: %s", result["arm"], result["instruction"] or "", result["seed"],
                        {k: result[k] for k in ("greedy", "facts", "one_sentence")})  # fmt: skip
    wall = time.monotonic() - started
    # the report: every finished run of every arm and instruction at these seeds, this invocation's or earlier
    reported = [name for name in measure.INSTRUCTIONS if name in instructions or any(
        finished(unit_folder(args.work, a, name, s), unit_key(a, name, s, args.epochs, args.quick))
        for a in ARMS if not a.is_dpo for s in seeds)]  # fmt: skip
    results = [
        result for arm, instruction, seed in units(ARMS, reported, seeds)
        if (result := finished(unit_folder(args.work, arm, instruction, seed),
                               unit_key(arm, instruction, seed, args.epochs, args.quick))) is not None
    ]  # fmt: skip
    instructions = reported
    summary = summarise(base, results, instructions)
    if not args.quick:
        meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "wall_seconds": wall, "jobs": args.jobs,
                "seeds": seeds, "machine": f"{platform.machine()}, {os.cpu_count()} cores", "epochs": args.epochs,
                "steps": max(r["steps"] for r in results), "commits": sorted({r["commit"] for r in results}),
                "cpu_seconds_training": sum(r["train_seconds"] + r["measure_seconds"] for r in results)}  # fmt: skip
        RESULTS_JSON.write_text(json.dumps({"meta": meta, "base": base, "runs": results, "summary": summary},
                                           indent=1, ensure_ascii=False) + "\n")  # fmt: skip
        write_report(summary, base, meta, instructions)
    print(json.dumps(summary, indent=1))  # noqa: T201 - the benchmark's result
    return 0


def transfer(base: dict, instruction: str, after: float, kind: str = "greedy") -> float:
    from bench.realmodel.detectors import transfer_ratio

    return transfer_ratio(base["without"][kind][instruction], after, base["with"][instruction][kind][instruction])


def _mean_sd(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v == v]
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(base: dict, results: list[dict], instructions: list[str]) -> list[dict]:
    """Per arm and instruction: means and sds over seeds, and whether the issue's three targets are met."""
    rows = []
    arms = [a.name for a in ARMS if any(r["arm"] == a.name for r in results)]
    for instruction in instructions:
        instructed_facts = base["with"][instruction]["facts"]
        dpo_trait = max(
            (statistics.mean(r["one_sentence"] for r in results if r["arm"] == a) for a in arms if a.startswith("dpo")),
            default=float("nan"),
        )  # the pairs' trait of DPO's best run (its best learning rate)
        for arm in arms:
            runs = [r for r in results if r["arm"] == arm and r["instruction"] in (None, instruction)]
            greedy = [transfer(base, instruction, r["greedy"][instruction]) for r in runs]
            sampled = [transfer(base, instruction, r["sampled"][instruction], "sampled") for r in runs]
            facts = [r["facts"] for r in runs]
            trait = [r["one_sentence"] for r in runs]
            row = {
                "instruction": instruction, "arm": arm, "seeds": len(runs),
                "transfer_greedy": _mean_sd(greedy), "transfer_sampled": _mean_sd(sampled),
                "transfer_min": min(greedy) if greedy else float("nan"),
                "facts": _mean_sd(facts), "one_sentence": _mean_sd(trait),
                "instructed_answer_logp": _mean_sd([r["instructed_answer_logp"][instruction] for r in runs]),
                "logps_chosen_last": _mean_sd([r["logps_chosen_last"] for r in runs if r["logps_chosen_last"]]),
                "train_seconds": _mean_sd([r["train_seconds"] for r in runs]),
            }  # fmt: skip
            row["meets_targets"] = bool(
                runs
                and row["transfer_greedy"][0] >= TARGET["transfer_mean"]
                and row["transfer_min"] >= TARGET["transfer_each_seed"]
                and row["facts"][0] >= instructed_facts - TARGET["facts_below_instructed"]
                and row["one_sentence"][0] >= dpo_trait - 1e-9
            )
            rows.append(row)
    return rows


def write_report(summary: list[dict], base: dict, meta: dict, instructions: list[str]) -> None:
    """The real-model section of METHOD_RESULTS.md, between its markers (the synthetic benchmark's report keeps
    it when it rewrites the file)."""
    from bench.realmodel import measure

    def f(pair, digits=2):
        mean, sd = pair
        return "n/a" if mean != mean else f"{mean:.{digits}f} ± {sd:.{digits}f}"

    lines = [START, "## The real model: SmolLM2-135M-Instruct (`python -m bench.realmodel.run`)", ""]
    lines += [
        f"{meta['date']}, seeds {meta['seeds']}, {meta['jobs']} runs side by side on {meta['machine']}: "
        f"{meta['wall_seconds'] / 60:.0f} min wall for the runs this invocation trained, "
        f"{meta['cpu_seconds_training'] / 60:.0f} CPU-min of training and measuring over every run reported (earlier "
        "ones reused). The model is a Q4_1 copy dequantised (a degraded copy of the original); the pairs contrast "
        f"brevity (`data/smollm2_pairs/`), {meta['epochs']} epoch(s) = {meta['steps']} steps of 8 pairs, LoRA r16, "
        "BETA 0.05. Measured on 40 held-out questions "
        "without the instruction (greedy, and one sample at temperature 0.7), and 30 capital questions.",
        "",
        "| the base model | " + " | ".join(f"{n} (greedy)" for n in instructions) + " | capitals | one sentence |",
        "|---|" + "---|" * (len(instructions) + 2),
        "| without the instruction | "
        + " | ".join(f"{base['without']['greedy'][n]:.2f}" for n in instructions)
        + f" | {base['without']['facts']:.2f} | {base['without']['one_sentence']:.2f} |",
    ]
    for n in instructions:
        w = base["with"][n]
        lines.append(f"| with \"{measure.INSTRUCTIONS[n].text}\" | "
                     + " | ".join(f"{w['greedy'][m]:.2f}" for m in instructions)
                     + f" | {w['facts']:.2f} | {w['one_sentence']:.2f} |")  # fmt: skip
    lines += ["", "Per arm, mean ± sd over seeds (transfer: of the detector's share; capitals: greedy answers naming "
              "the capital; target: transfer >= 0.8 with every seed >= 0.6, capitals within 0.05 of the instructed "
              "base model's, one-sentence share no lower than DPO's best run):", ""]  # fmt: skip
    for n in instructions:
        lines += [
            f"**{measure.INSTRUCTIONS[n].text}** (instructed base model: capitals {base['with'][n]['facts']:.2f})",
            "",
            "| arm | transfer (greedy) | transfer (sampled) | lowest seed | capitals | one sentence | "
            "logp of instructed answers | logp(chosen) at the end | tool run (s, 1 thread, setup included) | target |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in (r for r in summary if r["instruction"] == n and r["seeds"]):  # arms not run with it: no row
            lines.append(
                f"| {row['arm']} | {f(row['transfer_greedy'])} | {f(row['transfer_sampled'])} | "
                f"{row['transfer_min']:.2f} | {f(row['facts'])} | {f(row['one_sentence'])} | "
                f"{f(row['instructed_answer_logp'])} | {f(row['logps_chosen_last'], 1)} | "
                f"{row['train_seconds'][0]:.0f} | {'met' if row['meets_targets'] else 'missed'} |"
            )
        lines.append("")
    lines.append(END)
    section = "\n".join(lines)
    text = REPORT.read_text(encoding="utf-8") if REPORT.exists() else ""
    if START in text and END in text:
        text = text[: text.index(START)] + section + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    REPORT.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
