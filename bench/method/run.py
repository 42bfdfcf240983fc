"""The controlled method benchmark: does the preference guidance do what plain DPO cannot?

    python -m bench.method.run            # from the repository root; CPU, about 32 minutes on 2 cores

Builds and pretrains a tiny model on the synthetic world of `world.py` (the instruction makes answers
concise *and* polite), writes preference pairs that contrast concision only, then trains every arm
through the tool's own entry point (`train_with_preference_prompt.main`) with the same steps, batch and
LoRA settings, and measures each trained model on held-out questions and topics (`evaluate.py`):

- plain DPO (`ALPHA=0`) at several learning rates: the curve every other arm is compared against at a
  matched parameter-change size;
- `hinge` and `ref_hinge` at one ALPHA; `distill` and `ref_distill` over ALPHA, reduction and learning
  rate (`ARMS`), the exact teacher beside the top-K one, and a soft prompt learned by STAGE=ptune;
- every arm with 10 seeds, each a full replicate: its own pretraining corpus and base model, training
  pairs, LoRA initialisation and data order, replicates side by side (`--jobs`), one thread each.

Writes `bench/method/results.json` (every run), `METHOD_RESULTS.md` (table, matched-step comparison,
command, date, versions) and `bench/method/trait_two_vs_step.png`. Finished runs are kept in
`bench/method/work/` and skipped on a rerun while the benchmark's and the tool's sources are unchanged
(`--fresh` starts over); the pretrained base models are cached there too.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import io
import json
import logging
import multiprocessing
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
RESULTS_JSON = HERE / "results.json"
PLOT = HERE / "trait_two_vs_step.png"
REPORT = REPO / "METHOD_RESULTS.md"

logger = logging.getLogger("bench.method")


@dataclass(frozen=True)
class Arm:
    name: str
    align_loss: str = "hinge"
    alpha: float = 0.0
    lr_scale: float = 1.0
    distill_top_k: int | None = None
    distill_reduction: str = "token_mean"
    learned_prompt: bool = False  # embedding mode with the soft prompt STAGE=ptune learned on the seed's pairs
    epochs: int | None = None  # None: TRAINING's

    @property
    def is_dpo(self) -> bool:
        return self.alpha == 0.0


BASE_LR = 1e-3
# The hinge forms have said what they can say (one ALPHA each, as the first round found them equal to DPO).
# The distillation forms: `token_mean` (the KL averaged over response tokens) at two ALPHAs, `sequence_sum`
# (summed over each response) over an ALPHA range and at larger learning rates: with AdamW a larger ALPHA
# changes the direction of the step, not its size, so where the term already dominates the step only the
# learning rate moves the model further, and a fixed teacher (the instructed reference) is what keeps a
# larger step from running away. DPO's sweep reaches as far up, so every arm's step size stays inside it.
DPO_LR_SCALES = (0.5, 1.0, 2.0, 4.0)
TOP_K = 16
SUM = "sequence_sum"
# the form picked on seed 0 alone, before the 10-replicate run (the learned-prompt arm and --quick use it)
CANDIDATE = f"ref_distill top{TOP_K} sum a=1 lr x2"
ARMS = (
    *(Arm(f"dpo lr x{s:g}", lr_scale=s) for s in DPO_LR_SCALES),
    Arm("hinge a=1", align_loss="hinge", alpha=1.0),
    Arm("ref_hinge a=1", align_loss="ref_hinge", alpha=1.0),
    Arm("distill a=1", align_loss="distill", alpha=1.0),
    Arm("distill sum a=1 lr x2", align_loss="distill", alpha=1.0, distill_reduction=SUM, lr_scale=2.0),
    *(Arm(f"ref_distill top{TOP_K} a={a:g}", align_loss="ref_distill", alpha=a, distill_top_k=TOP_K)
      for a in (1.0, 10.0)),
    *(Arm(f"ref_distill top{TOP_K} sum a={a:g}", align_loss="ref_distill", alpha=a, distill_top_k=TOP_K,
          distill_reduction=SUM) for a in (0.3, 1.0)),
    *(Arm(f"ref_distill top{TOP_K} sum a=1 lr x{s:g}", align_loss="ref_distill", alpha=1.0, distill_top_k=TOP_K,
          distill_reduction=SUM, lr_scale=s) for s in (2.0, 4.0)),
    # the exact teacher (a reference forward every step) beside its top-K twin: what the truncation changes
    Arm("ref_distill exact sum a=1 lr x2", align_loss="ref_distill", alpha=1.0, distill_reduction=SUM, lr_scale=2.0),
    # on the policy's own sampled answers, the reverse KL to the instructed reference (ALIGN_LOSS=onpolicy_distill)
    Arm("onpolicy_distill rkl a=1 lr x2", align_loss="onpolicy_distill", alpha=1.0, lr_scale=2.0),
    # the candidate at twice the steps, at least the on-policy arm's wall time (its runs took 1.75x as long)
    Arm(f"ref_distill top{TOP_K} sum a=1 lr x2 4 epochs", align_loss="ref_distill", alpha=1.0, distill_top_k=TOP_K,
        distill_reduction=SUM, lr_scale=2.0, epochs=4),
    # a soft prompt learned by STAGE=ptune in place of the text instruction, with the candidate form
    Arm(f"{CANDIDATE} learned prompt", align_loss="ref_distill", alpha=1.0, distill_top_k=TOP_K,
        distill_reduction=SUM, lr_scale=2.0, learned_prompt=True),
)  # fmt: skip
assert CANDIDATE in {arm.name for arm in ARMS}
# Each seed is a full replicate: its own pretraining corpus and base model, training pairs, LoRA init and
# data order. (Training seeds alone understate the spread: the base model moves the results more.)
SEEDS = tuple(range(10))
# --quick (a CI smoke test): one replicate, plain DPO and the candidate form; results under --work only
QUICK_ARMS = ("dpo lr x1", CANDIDATE)
TRAINING = {  # the same for every arm
    "beta": 0.1,
    "per_device_train_batch_size": 16,
    "num_train_epochs": 2,
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
}
PAIRS_PER_TRAIN_QUESTION = 4
PAIRS_PER_EVAL_QUESTION = 2


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr, force=True)
    logging.getLogger("transformers").setLevel(logging.WARNING)


def write_data(folder: Path, seed: int) -> Path:
    from bench.method import world

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"train_seed{seed}.jsonl"
    rows = world.preference_pairs(world.train_questions(), PAIRS_PER_TRAIN_QUESTION, seed=1000 + seed)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def _run_tool(settings: dict, what: str) -> None:
    """The tool's own entry point, its console captured (shown only if it fails)."""
    from train_with_preference_prompt import main

    argv = [item for key, value in settings.items() for item in (f"--{key}", str(value))]
    captured = io.StringIO()
    with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(captured):
        status = main(argv)
    _configure_logging()  # main() points the root logger at the captured stream
    if status != 0:
        raise RuntimeError(f"{what} failed ({status}): {captured.getvalue()[-2000:]}")


def learn_prompt(seed: int, base: Path, train_path: Path, eval_path: Path, folder: Path, cache: Path) -> dict:
    """STAGE=ptune on this seed's base model and training pairs (the tool's defaults: 16 virtual tokens
    initialised from the instruction's token embeddings, the DPO objective); the held-out pairs are its test
    set, so its summary holds the accuracy with the learned prompt, with the instruction and with neither."""
    from bench.method import world

    summary = folder / "prompt_embeddings.json"
    if not summary.exists():
        settings = {
            **{k: v for k, v in TRAINING.items() if not k.startswith("lora_")},
            "stage": "ptune",
            "model_name_or_path": base,
            "train_dataset_path": train_path,
            "test_dataset_path": eval_path,
            "preference_text": world.INSTRUCTION,
            "ptune_output_dir": folder,
            "output_dir": folder,
            "cache_dir": cache,
            "log_dir": folder / "tensorboard",
            "overwrite": "true",
            "resume_from_checkpoint": "false",
            "save_strategy": "no",
            "seed": seed,
            "max_length": 160,
            "report_to": "none",
            "disable_tqdm": "true",
        }
        _run_tool(settings, f"ptune seed {seed}")
    return json.loads(summary.read_text())


def write_eval_data(folder: Path, rows: list[dict]) -> Path:
    path = folder / "eval.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def train_arm(
    arm: Arm, seed: int, base: Path, train_path: Path, output: Path, prompt: Path | None, cache: Path
) -> None:
    from bench.method import world

    settings = {
        **TRAINING,
        "model_name_or_path": base,
        "train_dataset_path": train_path,
        "test_dataset_path": "",
        "preference_text": world.INSTRUCTION,
        "align_loss": arm.align_loss,
        "aligned_loss_weight": arm.alpha,
        **({"distill_top_k": arm.distill_top_k or 0} if arm.align_loss == "ref_distill" else {}),  # 0: exact
        **({"distill_reduction": arm.distill_reduction} if arm.align_loss in ("distill", "ref_distill") else {}),
        **({"training_mode": "embedding", "prompt_embedding_path": prompt} if arm.learned_prompt else {}),
        "learning_rate": BASE_LR * arm.lr_scale,
        **({"num_train_epochs": arm.epochs} if arm.epochs else {}),
        "seed": seed,
        "output_dir": output,
        "log_dir": output / "tensorboard",
        "cache_dir": cache,
        "overwrite": "true",
        "resume_from_checkpoint": "false",
        "save_strategy": "no",
        "logging_steps": 8,
        "max_length": 160,
        "report_to": "none",
        "disable_tqdm": "true",
    }
    _run_tool(settings, f"{arm.name} seed {seed}")


def measure_run(base: Path, adapter: Path | None, pairs, questions) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.method import evaluate

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return evaluate.measure(model, tokenizer, pairs, questions, base_state)


def ref_target_by_politeness(base: Path, train_path: Path) -> list[dict]:
    """The instructed base model's margin `h_ref_pref` (ref_hinge's target) on the training pairs, grouped by
    which of chosen and rejected ends politely: it shows what the per-pair weights of the hinge forms know."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.method import evaluate, world

    rows = [json.loads(line) for line in train_path.read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    lp = evaluate.pair_logps(model, AutoTokenizer.from_pretrained(base), rows)
    target = lp["guided_chosen"] - lp["guided_rejected"]
    groups = []
    for chosen_polite in (True, False):
        for rejected_polite in (True, False):
            index = [
                i for i, r in enumerate(rows)
                if world.is_polite(r["chosen"][0]["content"]) == chosen_polite
                and world.is_polite(r["rejected"][0]["content"]) == rejected_polite
            ]  # fmt: skip
            values = target[index]
            groups.append(
                {"chosen_polite": chosen_polite, "rejected_polite": rejected_polite, "pairs": len(index),
                 "mean": values.mean().item(), "min": values.min().item(), "max": values.max().item()}
            )  # fmt: skip
    return groups


def fingerprint(*files: str, tool: bool = False) -> str:
    """A short hash of this benchmark's own sources (and, with `tool`, the tool's): cached results are reused
    only while they match."""
    digest = hashlib.sha256()
    paths = [HERE / name for name in files]
    if tool:
        paths += [REPO / "train_with_preference_prompt.py", *sorted((REPO / "preference_dpo").glob("*.py"))]
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def run_seed(seed: int, arm_names: list[str], work: Path, fresh: bool, done: set[str]) -> tuple[dict, list[dict]]:
    """One replicate: pretrain (or reuse) the seed's base model, learn its soft prompt if an arm needs one,
    measure the base model, then train and measure every arm not in `done`. Runs in a worker process."""
    import torch

    _configure_logging()
    # One thread per process: the model is tiny (hidden 64), so a second thread mostly spins, and on a machine
    # with any other load that spinning made pretraining 10x slower (one epoch in 350 s, against 27 s). The
    # cores go to replicates running side by side instead (--jobs).
    torch.set_num_threads(1)
    from bench.method import pretrain, world

    eval_pairs = world.preference_pairs(world.eval_questions(), PAIRS_PER_EVAL_QUESTION, seed=2)
    eval_questions = world.eval_questions()
    base_key, run_key = fingerprints()
    arms = [a for a in ARMS if a.name in arm_names]
    base = work / f"base_model_seed{seed}"
    marker = base / "pretraining.json"
    if fresh or not marker.exists() or json.loads(marker.read_text()).get("fingerprint") != base_key:
        logger.info("Seed %d: pretraining the base model on the synthetic world ...", seed)
        pretrain.pretrain(base, seed=seed)
        _update_marker(marker, fingerprint=base_key)
    data = work / f"data_seed{seed}"
    train_path = write_data(data, seed)
    baseline = measure_run(base, None, eval_pairs, eval_questions)
    baseline["seed"] = seed
    baseline["pretraining_seconds"] = json.loads(marker.read_text())["seconds"]
    baseline["ref_target_by_politeness"] = ref_target_by_politeness(base, train_path)
    prompt = None
    if any(a.learned_prompt for a in arms):
        folder = work / f"ptune_seed{seed}"
        if fresh or json.loads(marker.read_text()).get("prompt_fingerprint") != run_key:
            shutil.rmtree(folder, ignore_errors=True)  # a prompt learned on another base model or code
        t0 = time.monotonic()
        summary = learn_prompt(seed, base, train_path, write_eval_data(data, eval_pairs), folder, work / "cache")
        _update_marker(marker, prompt_fingerprint=run_key)
        prompt = folder / "prompt_embeddings.pt"
        baseline["learned_prompt"] = summary["held_out_comparison"]
        baseline["ptune_seconds"] = summary.get("seconds", round(time.monotonic() - t0, 1))
        accuracy = {name: round(row["accuracy"], 3) for name, row in summary["held_out_comparison"].items()}
        logger.info("Seed %d: learned soft prompt; held-out pair accuracy %s", seed, accuracy)
    logger.info(
        "seed %d base model: margin %+.2f  polite_p %.3f (with the instruction %.3f)  greedy_polite %.2f",
        seed, baseline["margin"], baseline["polite_prob"], baseline["polite_prob_guided"], baseline["greedy_polite"],
    )  # fmt: skip
    rows = []
    for arm in arms:
        if arm.name in done:
            continue
        t0 = time.monotonic()
        output = work / "runs" / f"{arm.name.replace(' ', '_').replace('=', '')}-seed{seed}"
        train_arm(arm, seed, base, train_path, output, prompt, work / "cache")  # the work folder holds it all
        row = {"arm": arm.name, "seed": seed, **asdict(arm), **measure_run(base, output, eval_pairs, eval_questions)}
        row["seconds"] = round(time.monotonic() - t0, 1)
        row["fingerprint"] = run_key
        with open(work / "runs.jsonl", "a") as f:  # one short line per write: safe beside the other workers
            f.write(json.dumps(row) + "\n")
        rows.append(row)
        logger.info(
            "%-15s seed %d  %5.1fs  step %.3f  margin %+.2f  concise %.2f  polite_p %.3f  greedy_polite %.2f  "
            "dlogp_w %+.2f",
            arm.name, seed, row["seconds"], row["param_change"], row["margin"], row["greedy_concise"],
            row["polite_prob"], row["greedy_polite"], row["logp_chosen"] - baseline["logp_chosen"],
        )  # fmt: skip
    return baseline, rows


def _update_marker(marker: Path, **fields) -> None:
    """Add `fields` to a base model's `pretraining.json` (what it was made from, and the prompt learned on it)."""
    marker.write_text(json.dumps({**json.loads(marker.read_text()), **fields}) + "\n")


def fingerprints() -> tuple[str, str]:
    """The base models' key (the world and pretraining) and the runs' key (everything the runs depend on)."""
    base = ("world.py", "encoding.py", "pretrain.py")
    return fingerprint(*base), fingerprint(*base, "evaluate.py", "run.py", tool=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fresh", action="store_true", help="Retrain the base model and every arm.")
    parser.add_argument("--arms", nargs="*", help="Only arms whose name starts with one of these (debugging).")
    parser.add_argument("--seeds", type=int, nargs="*", default=list(SEEDS))
    parser.add_argument("--quick", action="store_true", help="One replicate, two arms (a smoke test).")
    parser.add_argument("--work", type=Path, default=WORK, help="Folder for base models, runs and partial results.")
    parser.add_argument(
        "--jobs", type=int, default=len(os.sched_getaffinity(0)),
        help="Replicates trained side by side, one thread each (default: the usable CPU cores).",
    )  # fmt: skip
    args = parser.parse_args(argv)
    work = args.work
    if args.quick:
        args.seeds = [SEEDS[0]]
    _configure_logging()
    from bench.method import report

    started = time.monotonic()
    _, run_key = fingerprints()
    work.mkdir(parents=True, exist_ok=True)
    done_path = work / "runs.jsonl"
    done = {}
    if done_path.exists() and not args.fresh:
        for line in done_path.read_text().splitlines():
            row = json.loads(line)
            if row.get("fingerprint") == run_key:  # runs made with other code or settings are redone
                done[(row["arm"], row["seed"])] = row
    elif done_path.exists():
        done_path.unlink()

    if args.quick:
        arms = [a for a in ARMS if a.name in QUICK_ARMS]
    else:
        arms = [a for a in ARMS if not args.arms or any(a.name == p or a.name.startswith(p + " ") for p in args.arms)]
    names = [a.name for a in arms]
    jobs = max(1, min(args.jobs, len(args.seeds)))
    logger.info("%d replicates x %d arms, %d at a time", len(args.seeds), len(arms), jobs)
    baselines = {}
    # spawn: a fresh interpreter per worker (torch and fork do not mix)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = [
            pool.submit(run_seed, seed, names, work, args.fresh, {a for (a, s) in done if s == seed})
            for seed in args.seeds
        ]
        for future in futures:
            baseline, rows = future.result()
            baselines[baseline["seed"]] = baseline
            done.update({(row["arm"], row["seed"]): row for row in rows})
    wall = time.monotonic() - started

    runs = [done[(a.name, s)] for a in ARMS for s in SEEDS if (a.name, s) in done]
    complete = len(runs) == len(ARMS) * len(SEEDS) and set(baselines) == set(SEEDS)
    # a partial run (--arms, --seeds) never replaces the committed results
    results = RESULTS_JSON if complete else work / "results_partial.json"
    baselines = dict(sorted(baselines.items()))
    results.write_text(json.dumps({"baselines": list(baselines.values()), "runs": runs}, indent=1) + "\n")
    if complete:
        # pretraining plus every run, one process each: the same on a rerun that reuses finished runs
        seconds = report.total_seconds(baselines, runs)
        report.write(REPORT, PLOT, baselines, runs, ARMS, "python -m bench.method.run", seconds, settings_text(),
                     wall_seconds=wall, jobs=jobs)  # fmt: skip
        logger.info("Wrote %s and %s (%.1f min)", REPORT, PLOT, wall / 60)
    else:
        logger.info("Partial run (%d of %d runs, %.1f min): %s only", len(runs), len(ARMS) * len(SEEDS), wall / 60,
                    results)  # fmt: skip
    return 0


def settings_text() -> str:
    from bench.method import pretrain, world

    return (
        f"Base LR {BASE_LR:g}; DPO LR scales {', '.join(f'{s:g}' for s in DPO_LR_SCALES)}; top-K {TOP_K}; "
        f"seeds {SEEDS}; " + ", ".join(f"{k}={v}" for k, v in TRAINING.items()) + f"; "
        f"{len(world.train_questions()) * PAIRS_PER_TRAIN_QUESTION} train pairs, "
        f"{len(world.eval_questions()) * PAIRS_PER_EVAL_QUESTION} held-out pairs on {len(world.eval_questions())} "
        f"held-out questions; base model {pretrain.MODEL_SHAPE}; {platform.processor() or platform.machine()}."
    )


if __name__ == "__main__":
    sys.exit(main())
