"""Where a step's time goes: the base forward and backward, and the pieces of the guided forward.

    python bench/profile_guided.py --config large

Times, on the benchmark's model and batch shape (LoRA on every linear layer, fp32 on CPU): the base view's
forward with TRL's fused LM head (with gradient) and its backward; the guided view done whole (`full`);
and the shared-prompt guided view split into its prompt pass and its response pass, and the response
pass with and without the LM head. Medians over repeats, interleaved.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="large")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch
    from peft import LoraConfig, get_peft_model
    from step_time import CONFIGS, Shape, build_model
    from transformers import DynamicCache
    from trl.trainer.utils import add_fused_lm_head

    torch.set_num_threads(args.threads)
    shape = Shape()
    vocab = CONFIGS[args.config][5]
    model = build_model(args.config, "cpu", torch.float32)
    add_fused_lm_head(model)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    g = torch.Generator().manual_seed(0)
    n, p, c, k = shape.pairs, shape.prompt, shape.completion, shape.instruction

    def ids(*size):
        return torch.randint(2, vocab, size, generator=g)

    base_ids = ids(2 * n, p + c)
    base_labels = base_ids.clone()
    base_labels[:, :p] = -100
    guided_prompt = ids(n, p + k)
    completions = ids(2 * n, c)
    full_ids = torch.cat([guided_prompt.repeat(2, 1), completions], 1)
    full_labels = full_ids.clone()
    full_labels[:, : p + k] = -100
    embed = model.get_input_embeddings()
    causal_lm = model.get_base_model()

    def base_forward_backward(timings):
        start = time.perf_counter()
        out = model(input_ids=base_ids, labels=base_labels, fused_lm_head=True, use_cache=False)
        loss = out.log_probs.sum()
        mid = time.perf_counter()
        loss.backward()
        end = time.perf_counter()
        model.zero_grad(set_to_none=True)
        timings["base forward (grad)"].append(mid - start)
        timings["base backward"].append(end - mid)

    @torch.no_grad()
    def guided_full(timings):
        start = time.perf_counter()
        model(input_ids=full_ids, labels=full_labels, fused_lm_head=True, use_cache=False)
        timings["guided, full"].append(time.perf_counter() - start)

    @torch.no_grad()
    def guided_shared(timings):
        start = time.perf_counter()
        cache = DynamicCache(config=causal_lm.config)
        prompt_embeds = embed(guided_prompt)
        causal_lm.base_model(inputs_embeds=prompt_embeds[:, :-1], past_key_values=cache, use_cache=True)
        mid = time.perf_counter()
        cache.batch_repeat_interleave(2)
        inputs = torch.cat([prompt_embeds[:, -1:].repeat_interleave(2, 0), embed(completions)], 1)
        labels = torch.cat([torch.full((2 * n, 1), -100), completions], 1)
        positions = (p + k - 1 + torch.arange(c + 1)).expand(2 * n, -1)
        model(inputs_embeds=inputs, position_ids=positions, past_key_values=cache, labels=labels, fused_lm_head=True)
        end = time.perf_counter()
        timings["guided, shared: prompt pass"].append(mid - start)
        timings["guided, shared: response pass"].append(end - mid)

    @torch.no_grad()
    def response_body_only(timings):
        cache = DynamicCache(config=causal_lm.config)
        prompt_embeds = embed(guided_prompt)
        causal_lm.base_model(inputs_embeds=prompt_embeds[:, :-1], past_key_values=cache, use_cache=True)
        cache.batch_repeat_interleave(2)
        inputs = torch.cat([prompt_embeds[:, -1:].repeat_interleave(2, 0), embed(completions)], 1)
        positions = (p + k - 1 + torch.arange(c + 1)).expand(2 * n, -1)
        start = time.perf_counter()
        causal_lm.base_model(inputs_embeds=inputs, position_ids=positions, past_key_values=cache)
        timings["response pass without LM head"].append(time.perf_counter() - start)

    from collections import defaultdict

    timings = defaultdict(list)
    for i in range(args.repeats + 1):
        current = timings if i else defaultdict(list)  # first round: warm-up
        for fn in (base_forward_backward, guided_full, guided_shared, response_body_only):
            fn(current)
    medians = {name: statistics.median(values) for name, values in timings.items()}
    step = medians["base forward (grad)"] + medians["base backward"]
    print(f"config {args.config} {CONFIGS[args.config]}, {n} pairs x ({p}+{c}) tokens, {k} instruction tokens")  # noqa: T201
    for name, value in medians.items():
        print(f"{name:<34}{value:>8.3f} s{value / step:>8.2f} x (base fwd+bwd)")  # noqa: T201
    head = medians["guided, shared: response pass"] - medians["response pass without LM head"]
    print(f"{'LM head share of the response pass':<34}{head:>8.3f} s")  # noqa: T201


if __name__ == "__main__":
    main()
