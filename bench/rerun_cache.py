"""Rerun time with and without the cache: the same job rerun with another ALPHA, as a user tuning it would.

    python3 bench/rerun_cache.py                 # about 15 min on 2 busy CPU cores; writes bench/results/rerun_cache_large.json
    python3 bench/rerun_cache.py --config tiny   # the embedded demo (build tiny_model/ first: ./fast_train.sh)
    python3 bench/rerun_cache.py --config smollm2 --repeats 1   # DEMO=smollm2 cut to 2 steps: ~12 min

`--config large`: a random-weight Qwen2 of hidden 512, 8 layers (8 heads, 2 KV heads, MLP 1536) with the
embedded tokenizer, on the first 200 embedded training pairs, one epoch. `--config tiny`: the embedded
model and data. `--config smollm2`: `DEMO=smollm2` (the real model, its pairs and held-out set, evaluation
before and after) cut to `MAX_STEPS=2`, since what differs between the runs is the setup. A first run fills a fresh cache; then reruns alternate, `CACHE=true` and `CACHE=false`,
each with another ALPHA and RUN_NAME. Each run's wall time (the launcher, end to end) and its setup time
(tokenizing, loading, reference pass: the report's figure) are recorded, with the load average, and whether the
reference pass and the default form's top-K teacher pass were reused.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def large_model(folder: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(REPO / "tiny_model")
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run(work: Path, name: str, env: dict) -> dict:
    load = os.getloadavg()[0]
    started = time.monotonic()
    result = subprocess.run(
        ["bash", str(REPO / "fast_train.sh")],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "DEVICE": "cpu", "RUN_NAME": name,
             "OUTPUT_DIR": str(work / "out" / name), "LOG_DIR": str(work / "logs" / name), **env},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    wall = time.monotonic() - started
    setup = re.search(r"setup \(tokenizing, loading, reference pass\) ([\d.]+) s", result.stdout)
    return {
        "run": name,
        "cache": env.get("CACHE", "true"),
        "wall_s": round(wall, 1),
        "setup_s": float(setup.group(1)) if setup else None,
        "reference_pass_reused": "no reference pass" in result.stdout,
        "teacher_pass_reused": "no teacher pass" in result.stdout + result.stderr,  # the default ref_distill's
        "load_before": round(load, 2),
        "load_after": round(os.getloadavg()[0], 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=("large", "tiny", "smollm2"), default="large")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = {"CACHE_DIR": str(work / "cache")}
        if args.config == "large":
            rows = (REPO / "data" / "preference_pairs" / "train.jsonl").read_text(encoding="utf-8").splitlines()
            (work / "train.jsonl").write_text("\n".join(rows[:200]) + "\n", encoding="utf-8")
            env |= {
                "POLICY_MODEL_PATH": str(large_model(work / "model")),
                "TRAIN_DATASET_PATH": str(work / "train.jsonl"),
            }
        elif args.config == "smollm2":
            env |= {"DEMO": "smollm2", "MAX_STEPS": "2"}
        runs = [run(work, "first", {**env, "ALPHA": "0.1"})]
        for i in range(args.repeats):
            for cache in ("true", "false"):
                runs.append(run(work, f"rerun_{cache}_{i}", {**env, "ALPHA": f"0.{2 + i}", "CACHE": cache}))
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"config": args.config, "date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(), "runs": runs}
    (RESULTS / f"rerun_cache_{args.config}.json").write_text(json.dumps(record, indent=1) + "\n")
    json.dump(record, sys.stdout, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
