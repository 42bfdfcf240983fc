"""Side-by-side training-step cost: TRL's plain DPO against preference-guided DPO.

    python bench/step_time.py --config large            # CPU, hidden 512 x 8 layers
    python bench/step_time.py --config tiny
    python bench/step_time.py --config smollm2          # CPU: SmolLM2-135M's shape (Llama, 30 layers, vocab 49k)
    python bench/step_time.py --config qwen1.5b         # CUDA: Qwen2.5-1.5B shape, random weights, bf16

Configurations, all with LoRA (r=16, all linear layers), precomputed reference log-probs, the same
model, batches and settings, in one process:
  A  TRL's DPOTrainer                       (the baseline users would otherwise use)
  B  ours, ALPHA>0, text mode               (instruction inside the prompt)
  C  ours, ALPHA>0, embedding mode          (soft tokens after the prompt)
  D  ours, ALPHA=0                          (plain DPO through our trainer)
  E, F  B and C with the naive guided forward (`--guided_forward full`: prompt and response twice)
  G  B with ALIGN_LOSS=distill (token-level KL at response positions, instead of the hinge)
  H  B with ALIGN_LOSS=ref_distill, exact (the reference's guided forward in every step)
  I  B with ALIGN_LOSS=ref_distill --distill_top_k K (`--top_k`, default 64; the teacher precomputed)
  J  B with ALIGN_LOSS=ref_hinge (the reference's guided margins precomputed)
  K  B with ALIGN_LOSS=onpolicy_distill (every step generates ON_POLICY_TOKENS tokens per pair, then scores them)
  L  B with ALIGN_LOSS=context_distill (the reference's answers, ON_POLICY_TOKENS tokens each, generated at setup)
The weights are random: step time and memory depend on the shape, not on the values. `smollm2` is
SmolLM2-135M-Instruct's architecture (Llama) at the real-model benchmark's batch, 8 pairs of 160 tokens.
Steps run round-robin (A B C D A B C D ...) so machine drift hits all alike. Per configuration: median
optimizer-step time after warm-up, peak memory of a step (GPU: torch.cuda.max_memory_allocated; CPU: RSS
sampled every 2 ms, above the level before the step), tokens/s (base-view tokens), model FLOPs
utilisation on GPU; and the ratios to A. Also the one-time setup of each configuration (building the
trainer: TRL's reference precompute for all, the top-K teacher's for I). The table is printed last; the
figures are also written as JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CONFIGS = {
    # name: (hidden, layers, heads, kv_heads, intermediate, vocab)
    "tiny": (64, 2, 4, 2, 192, 2048),
    "large": (512, 8, 8, 2, 1536, 32000),
    "smollm2": (576, 30, 9, 3, 1536, 49152),
    "qwen1.5b": (1536, 28, 12, 2, 8960, 151936),
}
LLAMA_CONFIGS = ("smollm2",)  # the others are Qwen2 (attention with biases)


# Dense bf16 peak (TFLOP/s, no sparsity) by a fragment of the device name, first match: the MFU denominator.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H200", 989), ("A100", 312), ("L40S", 362),
                    ("RTX 4090", 165), ("RTX 3090", 71))  # fmt: skip


@dataclass
class Shape:
    pairs: int = 4
    prompt: int = 128
    completion: int = 172
    instruction: int = 16


# Per configuration, the shape when --pairs is not given: smollm2 runs the real-model benchmark's batch.
SHAPES = {"smollm2": Shape(pairs=8, prompt=40, completion=104, instruction=16)}


def build_model(name: str, device: str, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    hidden, layers, heads, kv, inter, vocab = CONFIGS[name]
    config_class, model_class = (
        (LlamaConfig, LlamaForCausalLM) if name in LLAMA_CONFIGS else (Qwen2Config, Qwen2ForCausalLM)
    )
    config = config_class(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, intermediate_size=inter, max_position_embeddings=1024, tie_word_embeddings=True,
        pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    return model_class(config).to(device=device, dtype=dtype)


def synthetic_pairs(n: int, shape: Shape, vocab: int, soft: bool):
    """Token-id pairs: prompt, chosen, rejected, and the guided prompt (instruction after a 1-token head)."""
    import random

    from datasets import Dataset

    rng = random.Random(0)

    def ids(k):
        return [rng.randrange(2, vocab) for _ in range(k)]

    rows = []
    for _ in range(n):
        prompt = ids(shape.prompt)
        guided = prompt + [0] * shape.instruction if soft else prompt[:1] + ids(shape.instruction) + prompt[1:]
        rows.append({
            "prompt_ids": prompt, "guided_prompt_ids": guided,
            "chosen_ids": ids(shape.completion), "rejected_ids": ids(shape.completion),
        })  # fmt: skip
    return Dataset.from_list(rows)


class RssPeak:
    """Peak resident memory above a baseline, sampled in a thread (CPU has no allocator statistics)."""

    def __init__(self, interval=0.002):
        import psutil

        self._process, self._interval = psutil.Process(), interval

    def __enter__(self):
        self.base = self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(self._interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def delta(self) -> int:
        return self.peak - self.base


# Kinds K and L's answers: random weights rarely end one, so each answer has this many tokens.
ON_POLICY_TOKENS = 32


def make_trainer(kind: str, model, dataset, args_kwargs, soft_embedding, top_k: int):
    """A plain TRL DPOTrainer (kind A) or ours (B to I), on pre-tokenized pairs."""
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from preference_dpo.collator import PreferenceViewsCollator
    from preference_dpo.config import PreferenceDPOConfig
    from preference_dpo.trainer import PreferenceGuidedDPOTrainer

    peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    pad = model.config.pad_token_id
    max_length = args_kwargs.pop("max_length")
    if kind == "A":

        class PlainDPO(DPOTrainer):
            def _prepare_dataset(self, dataset, *args, **kwargs):  # already token ids: TRL's math, unchanged
                return dataset

        args = DPOConfig(max_length=max_length, **args_kwargs)
        collator = DataCollatorForPreference(pad_token_id=pad, max_length=max_length)
        trainer = PlainDPO(model=model, args=args, train_dataset=dataset.remove_columns("guided_prompt_ids"),
                           processing_class=_tokenizer(), data_collator=collator, peft_config=peft)  # fmt: skip
    else:
        alpha = 0.0 if kind == "D" else 0.1
        guided_forward = "full" if kind in "EF" else "shared_prompt"
        embedding = kind in "CF"
        align_loss = {"G": "distill", "H": "ref_distill", "I": "ref_distill", "J": "ref_hinge",
                      "K": "onpolicy_distill", "L": "context_distill"}.get(kind, "hinge")  # fmt: skip
        on_policy = {"on_policy_max_new_tokens": ON_POLICY_TOKENS} if kind in "KL" else {}
        args = PreferenceDPOConfig(max_length=max_length, aligned_loss_weight=alpha, guided_forward=guided_forward,
                                   align_loss=align_loss, distill_top_k={"I": top_k, "H": 0}.get(kind),
                                   distill_reduction="token_mean", **on_policy, **args_kwargs)  # fmt: skip
        # (H: 0 is the exact KL; the reduction is fixed so that the figures stay comparable with earlier runs)
        k = soft_embedding.shape[0] if embedding else 0
        collator = PreferenceViewsCollator(pad_token_id=pad, max_length=max_length, num_soft_tokens=k,
                                           guided_forward=guided_forward)  # fmt: skip
        trainer = PreferenceGuidedDPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=_tokenizer(),
                                             data_collator=collator, peft_config=peft,
                                             prompt_embedding=soft_embedding if embedding else None)  # fmt: skip
    return trainer


def _tokenizer():
    """Any tokenizer with a pad token satisfies the trainer's constructor; the data are token ids already."""
    from transformers import AutoTokenizer

    path = REPO / "tiny_model"
    if not (path / "tokenizer.json").exists():
        from preference_dpo.tiny_model import build_tiny_model

        build_tiny_model(path)
    return AutoTokenizer.from_pretrained(path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="large")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=None, help="pairs per step (default: 4; smollm2: 8)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--kinds", default="ABCDEF", help="configurations to run, a subset of ABCDEFGHIJKL")
    parser.add_argument("--top_k", type=int, default=64, help="K of configuration I")
    parser.add_argument("--output", type=Path, default=None, help="JSON file (default: bench/results/<config>.json)")
    parser.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="recompute each layer's activations in backward (GRADIENT_CHECKPOINTING=true)",
    )
    parser.add_argument("--peak_tflops", type=float, default=None, help="GPU bf16 peak for MFU (default: by name)")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    if not cuda:
        torch.set_num_threads(args.threads)
    shape = SHAPES.get(args.config, Shape())
    if args.pairs is not None:
        shape = Shape(args.pairs, shape.prompt, shape.completion, shape.instruction)
    total = args.warmup + args.steps
    vocab = CONFIGS[args.config][5]
    hidden = CONFIGS[args.config][0]
    torch.manual_seed(1)
    soft = torch.randn(shape.instruction, hidden) * 0.02
    output_dir = tempfile.mkdtemp(prefix="bench_step_time_")  # fresh: the top-K teacher is computed, not reused
    common = dict(
        output_dir=output_dir, per_device_train_batch_size=shape.pairs, max_steps=total,
        learning_rate=1e-4, report_to="none", precompute_ref_log_probs=True, bf16=cuda, use_cpu=not cuda,
        gradient_checkpointing=args.gradient_checkpointing, save_strategy="no", eval_strategy="no", dataloader_num_workers=0,
        disable_dropout=True, max_length=shape.prompt + shape.instruction + shape.completion,
    )  # fmt: skip

    runs = {}
    for kind in args.kinds:
        dataset = synthetic_pairs(shape.pairs * total, shape, vocab, soft=kind in "CF")
        model = build_model(args.config, device, dtype)
        started = time.perf_counter()
        trainer = make_trainer(kind, model, dataset, dict(common), soft, args.top_k)
        setup_s = time.perf_counter() - started
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(), which this loop replaces
        if args.gradient_checkpointing:  # as Trainer.train() turns it on (with PEFT's input-gradient hook)
            trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        optimizer = trainer.create_optimizer()
        batches = [trainer._prepare_inputs(b) for b in trainer.get_train_dataloader()][:total]
        runs[kind] = {"trainer": trainer, "optimizer": optimizer, "batches": batches, "times": [], "memory": [],
                      "setup_s": setup_s}  # fmt: skip
    tokens = int(runs[args.kinds[0]]["batches"][0]["attention_mask"].sum())

    def step(run, i):
        trainer, optimizer = run["trainer"], run["optimizer"]
        batch = run["batches"][i]
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        gc.collect()
        start = time.perf_counter()
        with RssPeak() as rss:
            trainer.training_step(trainer.model, batch)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        memory = torch.cuda.max_memory_allocated() - base if cuda else rss.delta
        return elapsed, memory

    for i in range(total):  # round-robin: A B C D A B C D ...
        for kind in args.kinds:
            elapsed, memory = step(runs[kind], i)
            if i >= args.warmup:
                runs[kind]["times"].append(elapsed)
                runs[kind]["memory"].append(memory)

    flops_per_step = None
    peak_tflops = args.peak_tflops
    if cuda and peak_tflops is None:  # an unlisted GPU gets no MFU rather than a wrong one
        name = torch.cuda.get_device_name()
        peak_tflops = next((tflops for fragment, tflops in PEAK_BF16_TFLOPS if fragment in name), None)
    if cuda:
        params = sum(p.numel() for p in runs[args.kinds[0]]["trainer"].model.parameters())
        # Useful work of a plain DPO step with a frozen base: forward (2N per token) and the backward pass's
        # activation gradients (2N); no weight gradients for the base. The same figure for every
        # configuration, so extra work (the guided view) shows as lower utilisation.
        flops_per_step = 4 * params * tokens
    results = {}
    for kind, run in runs.items():
        median = statistics.median(run["times"])
        results[kind] = {
            "median_step_s": median,
            "step_s_quartiles": statistics.quantiles(run["times"], n=4),
            "peak_step_memory_bytes": max(run["memory"]),
            "tokens_per_s": tokens / median,
            "setup_s": run["setup_s"],
        }
        if flops_per_step and peak_tflops:
            results[kind]["mfu"] = flops_per_step / median / (peak_tflops * 1e12)
    base = results.get("A")
    if base:
        for r in results.values():
            r["time_ratio_to_A"] = r["median_step_s"] / base["median_step_s"]
            r["memory_ratio_to_A"] = r["peak_step_memory_bytes"] / max(base["peak_step_memory_bytes"], 1)

    meta = {
        "config": args.config, "model_shape": dict(zip(("hidden", "layers", "heads", "kv_heads", "intermediate",
                                                         "vocab"), CONFIGS[args.config], strict=True)),
        "pairs_per_step": shape.pairs, "prompt_tokens": shape.prompt, "completion_tokens": shape.completion,
        "instruction_tokens": shape.instruction, "base_tokens_per_step": tokens, "steps": args.steps,
        "warmup": args.warmup, "gradient_checkpointing": args.gradient_checkpointing, "device": torch.cuda.get_device_name() if cuda
        else platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "dtype": str(dtype),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "versions": {m: __import__(m).__version__ for m in ("torch", "transformers", "trl", "peft")},
    }  # fmt: skip
    meta["peak_bf16_tflops"] = peak_tflops
    output = args.output or REPO / "bench" / "results" / f"{args.config}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")

    names = {
        "A": "TRL DPO",
        "B": "ours text",
        "C": "ours embed",
        "D": "ours a=0",
        "E": "text, full",
        "F": "embed, full",
        "G": "text, distill",
        "H": "ref_distill",
        "I": f"ref_dist K{args.top_k}",
        "K": "onpolicy",
        "L": "context",
        "J": "ref_hinge",
    }
    lines = [
        f"config {args.config} {meta['model_shape']}, {shape.pairs} pairs x ({shape.prompt}+{shape.completion}) "
        f"tokens, {shape.instruction} instruction tokens, {meta['device']}, "
        f"{meta['threads']} threads",
        f"{'':14}{'step (s)':>10}{'IQR (s)':>16}{'mem (MiB)':>11}{'tok/s':>9}{'time/A':>8}{'mem/A':>7}{'setup (s)':>10}",
    ]
    for kind, r in results.items():
        q = r["step_s_quartiles"]
        lines.append(
            f"{kind} {names[kind]:<11}{r['median_step_s']:>10.3f}{f'{q[0]:.3f}-{q[2]:.3f}':>16}"
            f"{r['peak_step_memory_bytes'] / 2**20:>11.1f}{r['tokens_per_s']:>9.0f}"
            f"{r.get('time_ratio_to_A', float('nan')):>8.2f}{r.get('memory_ratio_to_A', float('nan')):>7.2f}"
            f"{r['setup_s']:>10.1f}"
        )
    print("\n".join(lines))  # noqa: T201 - the benchmark's report
    shutil.rmtree(output_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
