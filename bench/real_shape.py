"""The user guide's model shape through the real launcher: Qwen2.5-1.5B-Instruct's exact config, random weights.

    python3 bench/real_shape.py --layers 2     # a check of this script: 2 of the 28 layers
    python3 bench/real_shape.py                # the real shape, 28 layers (see BENCHMARKS.md for time and memory)

Nothing is downloaded. The model is Qwen2.5-1.5B-Instruct's published `config.json` (28 layers, hidden 1536,
12 query / 2 key-value heads, MLP 8960, vocabulary 151,936, tied embeddings, rope theta 1e6) with random
weights, written here in bf16 as the published checkpoint is. `--layers` keeps every other dimension and
drops layers, for checking this script on a small machine.

The tokenizer is the project's tiny one (2,048 ids, the same special tokens and chat template as Qwen2.5,
at ids 0-2 instead of 151643-151645; the model's special-token ids are set to match). The model only needs
ids below its vocabulary size, and the LM head still scores all 151,936 entries, so every tensor has the
real shape. The data are pairs from the embedded data set, lengthened so that the guided prompt nears
MAX_PROMPT_LENGTH and every guided sequence is cut at MAX_LENGTH: each step costs what the guide's worst
case costs.

For each training mode and ALIGN_LOSS form, `fast_train.sh` runs with the guide's settings (MAX_LENGTH=300,
MAX_PROMPT_LENGTH=128, LoRA r=16 / alpha 32 / dropout 0.1 on all linear layers, BETA 0.05, ALPHA 0.1,
one pair per micro-step) for `--steps` optimizer steps and a final evaluation. Checked: exit status 0,
finite losses, every TensorBoard tag of the form, the adapter's parameter count (computed from the
config) and file size, and that the adapter loads into `PeftModel` and changes the model's output.
Measured: the peak resident memory of the run (the largest process), the step time (between the
`loss/train` events of consecutive steps, the first step left out) and base-view tokens per step.

Also measured, in bf16 as a GPU would hold them: the activations one micro-step keeps for the backward
pass (tensors saved by autograd for the base view of one pair at MAX_LENGTH, with LoRA and dropout),
per layer, counted by autograd's saved-tensor hooks on 2- and 3-layer copies of the model.
Results are printed and written as JSON (default: bench/results/real_shape_<layers>l.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Qwen/Qwen2.5-1.5B-Instruct config.json, as published.
QWEN25_1_5B_INSTRUCT = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "hidden_size": 1536,
    "initializer_range": 0.02,
    "intermediate_size": 8960,
    "max_position_embeddings": 32768,
    "max_window_layers": 21,
    "model_type": "qwen2",
    "num_attention_heads": 12,
    "num_hidden_layers": 28,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

# The user guide's preset (4x RTX 3090/4090) and its other defaults, as launcher variables.
GUIDE = {
    "MAX_LENGTH": "300",
    "MAX_PROMPT_LENGTH": "128",
    "LORA_R": "16",
    "LORA_ALPHA": "32",
    "LORA_DROPOUT": "0.1",
    "LORA_TARGET_MODULES": "all-linear",
    "BETA": "0.05",
    "ALPHA": "0.1",
    "LEARNING_RATE": "5e-4",
    "PER_DEVICE_BATCH_SIZE": "1",
}
SOFT_TOKENS = 16  # embedding mode: virtual tokens in the prompt-embedding file
# per ALIGN_LOSS, the settings of its recommended form (README, "Which ALIGN_LOSS?"): ref_distill with the
# teacher's top 16 tokens precomputed and the KL summed over each response, at ALPHA 1
FORM_SETTINGS = {"ref_distill": {"DISTILL_TOP_K": "16", "DISTILL_REDUCTION": "sequence_sum", "ALPHA": "1"}}
TEST_PAIRS = 1  # evaluation runs twice at the end (the trainer's, then the pipeline's): kept small
# Appended to each user message so that the guided prompt nears MAX_PROMPT_LENGTH (about 27 tokens each).
PROMPT_FILLER = " Some background: I have read the usual advice and want a practical answer."
PROMPT_FILLERS = 2


def build_model_dir(folder: Path, layers: int) -> dict:
    """Qwen2.5-1.5B-Instruct's config with `layers` layers, random bf16 weights, and the tiny tokenizer."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from preference_dpo.tiny_model import build_tiny_model

    tiny = build_tiny_model(folder / "tiny")
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = Qwen2Config.from_dict(
        {**QWEN25_1_5B_INSTRUCT, "num_hidden_layers": layers, "bos_token_id": None, "eos_token_id": eos,
         "pad_token_id": tokenizer.pad_token_id}
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2ForCausalLM._from_config(config, dtype=torch.bfloat16)  # half the host memory of fp32
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    model_dir = folder / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    shutil.rmtree(tiny)
    parameters = model.num_parameters()
    del model
    return {"path": str(model_dir), "parameters": parameters, "config": config}


def lengthen(tokenizer, text: str, min_tokens: int) -> str:
    """`text` repeated until it has at least `min_tokens` tokens."""
    out = text
    while len(tokenizer(out)["input_ids"]) < min_tokens:
        out += " " + text
    return out


def write_pairs(folder: Path, tokenizer, n_train: int, min_response_tokens: int) -> tuple[Path, Path]:
    """Conversational pairs from the embedded data set, prompts and responses lengthened (see the docstring)."""
    source = REPO / "data" / "preference_pairs" / "train.jsonl"
    with open(source, encoding="utf-8") as f:
        rows = [json.loads(next(f)) for _ in range(n_train + TEST_PAIRS)]
    pairs = []
    for row in rows:
        user = row["prompt"] + PROMPT_FILLER * PROMPT_FILLERS
        pairs.append({
            "prompt": [{"role": "user", "content": user}],
            "chosen": [{"role": "assistant", "content": lengthen(tokenizer, row["chosen"][-1]["content"],
                                                                 min_response_tokens)}],
            "rejected": [{"role": "assistant", "content": lengthen(tokenizer, row["rejected"][-1]["content"],
                                                                   min_response_tokens)}],
        })  # fmt: skip
    paths = folder / "train.jsonl", folder / "test.jsonl"
    for path, part in zip(paths, (pairs[:n_train], pairs[n_train:]), strict=True):
        path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in part), encoding="utf-8")
    return paths


def expected_lora_parameters(config, rank: int) -> int:
    """LoRA parameters on every linear layer of the decoder: r x (in + out) per projection (no LM head)."""
    h, inter = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    per_layer = rank * (2 * (h + h) + 2 * (h + kv) + 3 * (h + inter))  # q, o; k, v; gate, up, down
    return per_layer * config.num_hidden_layers


def expected_tags(align_loss: str) -> tuple[set[str], set[str]]:
    """(tags that must be logged, tags that must not) for a run with ALPHA > 0 and a test set."""
    from preference_dpo.metrics import logged_tags

    return logged_tags(align_loss)


def read_scalars(log_dir: Path) -> dict[str, list[tuple[float, int, float]]]:
    """tag -> [(wall_time, step, value)] from the run's one TensorBoard events file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {
        tag: [(e.wall_time, e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]
    }


def launch(name: str, work: Path, env: dict[str, str]) -> dict:
    """Run fast_train.sh; its exit status, wall time and the peak resident memory of its largest process."""
    run_dir = work / "runs" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **env, "OUTPUT_DIR": str(run_dir / "out"), "LOG_DIR": str(run_dir / "logs")}
    log = run_dir / "launcher.log"
    start = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(["bash", str(REPO / "fast_train.sh")], env=env, stdout=f, stderr=subprocess.STDOUT)
        # wait4 reports the child's usage including its waited-for descendants: ru_maxrss is then the peak of
        # the largest process of the launcher's tree, the trainer.
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "returncode": proc.returncode,
        "wall_s": time.monotonic() - start,
        "peak_rss_bytes": usage.ru_maxrss * 1024,  # Linux reports KiB
        "cpu_s": usage.ru_utime + usage.ru_stime,  # on a shared machine, the figure that contention does not inflate
        "out": run_dir / "out",
        "logs": run_dir / "logs",
        "launcher_log": log,
    }


def check_run(run: dict, align_loss: str, steps: int, model_info: dict, rank: int, dtype) -> tuple[dict, list[str]]:
    """Measurements of a finished run, and every check it failed."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    problems: list[str] = []
    log_text = run["launcher_log"].read_text(errors="replace")
    if run["returncode"] != 0:
        return {}, [f"fast_train.sh exited with {run['returncode']}; the end of {run['launcher_log']}:\n"
                    + log_text[-3000:]]  # fmt: skip

    scalars = read_scalars(run["logs"])
    required, forbidden = expected_tags(align_loss)
    if missing := required - set(scalars):
        problems.append(f"tags not logged: {sorted(missing)}")
    if present := forbidden & set(scalars):
        problems.append(f"tags of another ALIGN_LOSS logged: {sorted(present)}")
    for tag in required & set(scalars):
        if not all(math.isfinite(v) for _, _, v in scalars[tag]):
            problems.append(f"{tag} is not finite: {[v for _, _, v in scalars[tag]]}")
    losses = scalars.get("loss/train", [])
    if [s for _, s, _ in losses] != list(range(1, steps + 1)):
        problems.append(f"loss/train logged at steps {[s for _, s, _ in losses]}, expected 1..{steps}")
    walls = [w for w, _, _ in losses]
    step_times = [b - a for a, b in zip(walls, walls[1:], strict=False)]  # step 1 carries start-up work
    history = json.loads((run["out"] / "trainer_state.json").read_text())["log_history"]
    tokens = [h["num_tokens"] for h in history if "loss" in h and "num_tokens" in h]
    trainer_peak = re.search(r"peak memory ([\d.]+) GiB", log_text)

    adapter_file = run["out"] / "adapter_model.safetensors"
    weights = load_file(str(adapter_file))
    numel = sum(t.numel() for t in weights.values())
    expected = expected_lora_parameters(model_info["config"], rank)
    if numel != expected:
        problems.append(f"adapter has {numel} parameters, expected {expected} (r={rank} on every linear layer)")
    payload = sum(t.numel() * t.element_size() for t in weights.values())
    size = adapter_file.stat().st_size
    if not payload <= size <= payload + 2**20:  # tensors plus a JSON header
        problems.append(f"adapter file is {size} bytes for {payload} bytes of tensors")
    if not all(torch.isfinite(t).all() for t in weights.values()):
        problems.append("adapter weights are not finite")

    base = AutoModelForCausalLM.from_pretrained(model_info["path"], dtype=dtype)
    model = PeftModel.from_pretrained(base, run["out"])
    model.eval()
    loaded = {name: p for name, p in model.named_parameters() if "lora_" in name}
    mismatched = []
    for key, tensor in weights.items():
        param = loaded.get(key.replace(".weight", ".default.weight"))
        if param is None or not torch.equal(param.detach().cpu(), tensor.to(param.dtype)):
            mismatched.append(key)
    if len(loaded) != len(weights) or mismatched:
        problems.append(
            f"PeftModel holds {len(loaded)} LoRA tensors, the file {len(weights)}; differing: {mismatched[:3]}"
        )
    ids = torch.arange(2, 34).unsqueeze(0)
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
    if not torch.isfinite(adapted).all() or torch.equal(adapted, plain):
        problems.append("the loaded adapter does not change the model's logits (or they are not finite)")
    del model, base

    measured = {
        "wall_s": round(run["wall_s"], 1),
        "cpu_s": round(run["cpu_s"], 1),
        "peak_rss_bytes": run["peak_rss_bytes"],
        "trainer_reported_peak_gib": float(trainer_peak.group(1)) if trainer_peak else None,
        "step_s": [round(t, 2) for t in step_times],
        "median_step_s": round(statistics.median(step_times), 2) if step_times else None,
        "base_tokens_per_step": [b - a for a, b in zip([0, *tokens], tokens, strict=False)],
        "loss": [v for _, _, v in losses],
        "adapter_parameters": numel,
        "adapter_bytes": size,
        "tags_checked": len(required),
    }
    return measured, problems


def saved_activation_bytes(layers: int, seq_len: int, rank: int, dtype) -> dict[str, int]:
    """Bytes autograd keeps for the backward pass of one pair's base view (2 x seq_len tokens).

    LoRA on every linear layer, dropout 0.1, training mode, all parameters in `dtype` (DeepSpeed's bf16 mode
    casts the LoRA weights too), the decoder only: TRL's fused LM head keeps just its input, and the
    decoder's activations do not depend on the vocabulary, which is cut to 2,048 here to save time.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    small_vocab = {"num_hidden_layers": layers, "vocab_size": 2048, "bos_token_id": None, "eos_token_id": None}
    config = Qwen2Config.from_dict({**QWEN25_1_5B_INSTRUCT, **small_vocab})
    torch.manual_seed(0)
    model = Qwen2ForCausalLM._from_config(config, dtype=dtype)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.1, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora).to(dtype)
    model.train()
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}
    scores: dict[int, int] = {}  # [.., T, T] tensors: attention probabilities, kept by some attention kernels

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
            if t.dim() >= 2 and t.shape[-1] == t.shape[-2] == seq_len:
                scores[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(3, config.vocab_size, (2, seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.base_model.model.model(input_ids=ids)
    return {"total": sum(saved.values()), "attention_scores": sum(scores.values())}


def activation_census(seq_len: int, rank: int) -> dict:
    """Per-layer and fixed saved-activation bytes in bf16, from 2- and 3-layer copies (layers are identical)."""
    import torch

    two = saved_activation_bytes(2, seq_len, rank, torch.bfloat16)
    three = saved_activation_bytes(3, seq_len, rank, torch.bfloat16)
    per_layer = three["total"] - two["total"]
    scores = three["attention_scores"] - two["attention_scores"]
    tokens = 2 * seq_len
    full = QWEN25_1_5B_INSTRUCT["num_hidden_layers"]
    return {
        "dtype": "bfloat16",
        "tokens": tokens,
        "per_layer_bytes": per_layer,
        "per_layer_attention_score_bytes": scores,
        "per_layer_bytes_per_token": per_layer / tokens,
        "offset_bytes": two["total"] - 2 * per_layer,  # beyond 2 x per layer (< 0: layer 0 needs no input gradient)
        "full_model_bytes": two["total"] + (full - 2) * per_layer,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=28, help="decoder layers (28: the real model)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per run (the first is not timed)")
    parser.add_argument("--modes", default="text,embedding", help="TRAINING_MODE values, comma-separated")
    parser.add_argument("--align_losses", default="hinge,ref_distill", help="ALIGN_LOSS values, comma-separated")
    parser.add_argument("--precision", default="auto", help="PRECISION for the runs: auto, bf16, fp16, fp32")
    parser.add_argument("--device", default="cpu", choices=("cpu", "gpu"), help="DEVICE for fast_train.sh")
    parser.add_argument("--work_dir", type=Path, default=Path("/tmp/real_shape"), help="model, data and runs")
    parser.add_argument("--output", type=Path, default=None, help="JSON (default: bench/results/real_shape_<N>l.json)")
    parser.add_argument("--no_census", action="store_true", help="skip the saved-activation count")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch
    import transformers
    from transformers import AutoTokenizer

    transformers.utils.logging.set_verbosity_error()
    work = args.work_dir / f"{args.layers}l"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    started = time.monotonic()
    model_info = build_model_dir(work, args.layers)
    tokenizer = AutoTokenizer.from_pretrained(model_info["path"])
    train, test = write_pairs(work, tokenizer, n_train=args.steps, min_response_tokens=int(GUIDE["MAX_LENGTH"]))
    embedding = work / "prompt_embeddings.pt"
    torch.manual_seed(1)
    torch.save({"prompt_embeddings": torch.randn(SOFT_TOKENS, model_info["config"].hidden_size) * 0.02}, embedding)
    # The dtype the launcher loads the model in (PRECISION auto is fp32 on CPU), for the PeftModel check.
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision, torch.float32)
    if args.precision == "auto" and args.device == "gpu":
        dtype = torch.bfloat16

    env = {
        **GUIDE, "DEVICE": args.device, "PRECISION": args.precision, "POLICY_MODEL_PATH": model_info["path"],
        "TRAIN_DATASET_PATH": str(train), "TEST_DATASET_PATH": str(test), "MAX_STEPS": str(args.steps),
        "GRADIENT_ACCUM_STEPS": "1", "LOGGING_STEPS": "1", "EVAL_STEPS": "100000", "SAVE_STEPS": "100000",
        "OVERWRITE": "true", "HF_HUB_OFFLINE": "1",
        # no sample generations: 48 greedy tokens of a 1.5B model per evaluation cost ~10 min on a CPU
        "NUM_SAMPLE_PROMPTS": "0",
    }  # fmt: skip
    runs, failures = {}, []
    for mode in args.modes.split(","):
        for align_loss in args.align_losses.split(","):
            name = f"{mode}_{align_loss}"
            extra = {"TRAINING_MODE": mode, "ALIGN_LOSS": align_loss, "RUN_NAME": name,
                     **FORM_SETTINGS.get(align_loss, {})}  # fmt: skip
            if mode == "embedding":
                extra["PROMPT_EMBEDDING_PATH"] = str(embedding)
            run = launch(name, work, {**env, **extra})
            measured, problems = check_run(run, align_loss, args.steps, model_info, int(GUIDE["LORA_R"]), dtype)
            runs[name] = {**measured, "ok": not problems, "problems": problems}
            failures += [f"{name}: {p}" for p in problems]
            shutil.rmtree(run["out"], ignore_errors=True)  # checkpoints of a multi-GB model: not kept

    census = None if args.no_census else activation_census(int(GUIDE["MAX_LENGTH"]), int(GUIDE["LORA_R"]))
    config = model_info["config"]
    result = {
        "meta": {
            "layers": args.layers, "model_parameters": model_info["parameters"],
            "model_config": {k: getattr(config, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                             "num_key_value_heads", "intermediate_size", "vocab_size",
                                                             "tie_word_embeddings")},
            "settings": {**GUIDE, "MAX_STEPS": args.steps, "PRECISION": args.precision, "DEVICE": args.device,
                         "SOFT_TOKENS": SOFT_TOKENS},
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "total_wall_s": round(time.monotonic() - started),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "versions": {m: __import__(m).__version__ for m in ("torch", "transformers", "trl", "peft")},
        },
        "runs": runs,
        "activation_census": census,
    }  # fmt: skip
    output = args.output or REPO / "bench" / "results" / f"real_shape_{args.layers}l.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)

    gib = 2**30
    lines = [
        f"Qwen2.5-1.5B-Instruct shape, {args.layers} of 28 layers, {model_info['parameters']:,} parameters, "
        f"{args.steps} steps of 1 pair, PRECISION={args.precision}, DEVICE={args.device}",
        f"{'run':<20}{'ok':>4}{'step (s)':>10}{'tokens/step':>13}{'peak RSS (GiB)':>16}{'adapter (MB)':>14}{'wall (s)':>10}{'CPU (s)':>9}",
    ]
    for name, r in runs.items():
        tokens = r.get("base_tokens_per_step") or [0]
        lines.append(
            f"{name:<20}{'yes' if r['ok'] else 'NO':>4}{r.get('median_step_s') or float('nan'):>10.2f}"
            f"{tokens[-1]:>13}{r.get('peak_rss_bytes', 0) / gib:>16.2f}{r.get('adapter_bytes', 0) / 1e6:>14.1f}"
            f"{r.get('wall_s', float('nan')):>10.0f}{r.get('cpu_s', float('nan')):>9.0f}"
        )
    if census:
        lines.append(
            f"saved activations, bf16, one pair at MAX_LENGTH ({census['tokens']} tokens): "
            f"{census['per_layer_bytes'] / 2**20:.1f} MiB per layer ({census['per_layer_bytes_per_token'] / 1024:.1f} "
            f"KiB per token; attention scores {census['per_layer_attention_score_bytes'] / 2**20:.1f} MiB of it), "
            f"{census['full_model_bytes'] / gib:.2f} GiB for 28 layers"
        )
    lines.append(f"written to {output}")
    lines += [f"FAILED {f}" for f in failures]
    print("\n".join(lines))  # noqa: T201 - the benchmark's report
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
