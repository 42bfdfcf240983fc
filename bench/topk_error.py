"""How far the top-K teacher of `ALIGN_LOSS=ref_distill --distill_top_k K` is from the exact KL.

    python bench/topk_error.py                      # the embedded tiny model (random weights), embedded pairs
    python bench/topk_error.py --model method       # the method benchmark's pretrained base model (seed 0)

Teacher: the frozen base model with the instruction; student: the same model with a LoRA adapter, without
it, at two points: at initialisation (adapter B = 0, policy = reference, as training starts) and with the
adapter's B set to random weights (scale 0.05). For every K: the loss value (`token_mean`) against the exact
KL, and its gradient in the LoRA weights (cosine, relative error of the vector), over one batch of pairs;
also the teacher's mass outside its top K (mean q_R). Writes the figures as JSON and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def load(model_name: str):
    """(model folder, preference rows, instruction) for `tiny` or `method`."""
    if model_name == "tiny":
        from preference_dpo.config import DEFAULT_PREFERENCE_TEXT
        from preference_dpo.data import load_preference_dataset
        from preference_dpo.tiny_model import build_tiny_model

        path = REPO / "tiny_model"
        if not (path / "config.json").exists():
            build_tiny_model(path)
        rows = load_preference_dataset(str(REPO / "data" / "preference_pairs" / "train.jsonl"))
        return path, rows, DEFAULT_PREFERENCE_TEXT
    from datasets import Dataset

    from bench.method import pretrain, world

    path = REPO / "bench" / "method" / "work" / "base_model_seed0"
    if not (path / "pretraining.json").exists():
        pretrain.pretrain(path, seed=0)
    rows = Dataset.from_list(world.preference_pairs(world.train_questions(), 4, seed=1000))
    return path, rows, world.INSTRUCTION


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "method"), default="tiny")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--top_k", type=int, nargs="*", default=[16, 64, 256])
    parser.add_argument(
        "--output", type=Path, default=None, help="JSON file (default: bench/results/topk_<model>.json)"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from preference_dpo.collator import PreferenceViewsCollator
    from preference_dpo.losses import token_kl, topk_teacher, topk_token_kl
    from preference_dpo.views import tokenize_preference_dataset

    torch.manual_seed(0)
    path, rows, instruction = load(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = tokenize_preference_dataset(
        rows.select(range(args.pairs)), tokenizer, name="train", preference_text=instruction,
        preference_position="system", num_soft_tokens=0, max_length=300, max_prompt_length=128,
    )  # fmt: skip
    batch = PreferenceViewsCollator(pad_token_id=tokenizer.pad_token_id, guided_forward="full")(list(data))
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
        LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"),
    ).eval()
    vocab = model.config.vocab_size
    mask = batch["completion_mask"][:, 1:].bool()
    guided_mask = batch["guided_completion_mask"][:, 1:].bool()
    with torch.no_grad(), model.disable_adapter():
        teacher = model(input_ids=batch["guided_input_ids"], attention_mask=batch["guided_attention_mask"]).logits
    teacher = teacher[:, :-1][guided_mask]
    params = [p for n, p in model.named_parameters() if p.requires_grad]

    results = {"model": args.model, "vocab": vocab, "pairs": args.pairs, "positions": int(mask.sum()), "points": {}}
    for point, scale in (("init", 0.0), ("perturbed", 0.05)):
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * scale)
        student = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][mask]
        exact = token_kl(student, teacher).mean()
        exact_grad = torch.cat([g.flatten() for g in torch.autograd.grad(exact, params, retain_graph=True)])
        rows_out = {"exact": {"value": exact.item()}}
        for k in [*args.top_k, vocab]:
            ids, logps, log_rest = topk_teacher(teacher, k)
            approx = topk_token_kl(student, ids, logps, log_rest).mean()
            grad = torch.cat([g.flatten() for g in torch.autograd.grad(approx, params, retain_graph=True)])
            rows_out[k] = {
                "value": approx.item(),
                "value_rel_error": (approx - exact).abs().item() / max(exact.item(), 1e-30),
                "grad_cosine": torch.nn.functional.cosine_similarity(grad, exact_grad, dim=0).item(),
                "grad_rel_error": ((grad - exact_grad).norm() / exact_grad.norm()).item(),
                "teacher_mass_outside_top_k": log_rest.exp().mean().item(),
            }
        results["points"][point] = rows_out

    output = args.output or REPO / "bench" / "results" / f"topk_{args.model}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"model {args.model} (vocab {vocab}), {args.pairs} pairs, {results['positions']} response positions"]
    lines.append(f"{'point':<10}{'K':>7}{'KL_K':>12}{'exact KL':>12}{'rel err':>9}{'grad cos':>10}{'grad err':>10}"
                 f"{'q_R':>8}")  # fmt: skip
    for point, rows_out in results["points"].items():
        for k, r in rows_out.items():
            if k == "exact":
                continue
            lines.append(
                f"{point:<10}{k:>7}{r['value']:>12.5f}{rows_out['exact']['value']:>12.5f}{r['value_rel_error']:>9.3f}"
                f"{r['grad_cosine']:>10.4f}{r['grad_rel_error']:>10.3f}{r['teacher_mass_outside_top_k']:>8.3f}"
            )
    print("\n".join(lines))  # noqa: T201 - the benchmark's report


if __name__ == "__main__":
    main()
