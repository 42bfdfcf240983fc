"""Held-out measures of one model, all without the instruction unless named `guided`.

- trait one: pair accuracy (`logp(concise) > logp(verbose)`) and mean margin `h_base` on held-out pairs;
- trait two: the probability the model gives the polite ending after a concise answer,
  `sigmoid(logp(core + polite) - logp(core))` (both ending with EOS), over all held-out questions and over
  the held-out topics alone (`_heldout_topics`, the transfer ratio's basis), and the rate of polite greedy
  generations; greedy generations are also checked for concision and for a correct core sentence;
- `logp(chosen)` on held-out pairs (its change from the base model shows over-optimisation);
- `pref_advantage_ratio` = `exp(mean(h_pref - h_base))` on held-out pairs (docs/method.md);
- parameter-change size: the Frobenius norm of all weight changes from the base model (adapter merged).
"""

from __future__ import annotations

import math

import torch

from . import world
from .encoding import right_pad, tokenize_rows


@torch.no_grad()
def sequence_logps(
    model, sequences: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 64
) -> torch.Tensor:
    """Sum of log-probabilities of each response given its prompt."""
    out = []
    for start in range(0, len(sequences), batch_size):
        ids, attention, response = right_pad(sequences[start : start + batch_size], pad_id)
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
        logps = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        out.append((logps * response[:, 1:]).sum(-1))
    return torch.cat(out)


def pair_logps(model, tokenizer, rows: list[dict]) -> dict[str, torch.Tensor]:
    views = tokenize_rows(tokenizer, rows)
    pad = tokenizer.pad_token_id
    result = {}
    for view, prompt in (("base", "prompt_ids"), ("guided", "guided_prompt_ids")):
        for side in ("chosen", "rejected"):
            result[f"{view}_{side}"] = sequence_logps(model, [(v[prompt], v[f"{side}_ids"]) for v in views], pad)
    return result


def polite_probability(model, tokenizer, questions: list[world.Question]) -> dict[str, float]:
    rows = [
        {
            "prompt": [{"role": "user", "content": q.text}],
            "chosen": [{"role": "assistant", "content": world.answer(q.topic, True, True)}],
            "rejected": [{"role": "assistant", "content": world.answer(q.topic, True, False)}],
        }
        for q in questions
    ]
    lp = pair_logps(model, tokenizer, rows)
    return {
        "polite_prob": torch.sigmoid(lp["base_chosen"] - lp["base_rejected"]).mean().item(),
        "polite_prob_guided": torch.sigmoid(lp["guided_chosen"] - lp["guided_rejected"]).mean().item(),
    }


@torch.no_grad()
def greedy_generations(model, tokenizer, questions: list[world.Question], max_new_tokens: int = 48) -> list[str]:
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q.text}], add_generation_prompt=True, tokenize=False)
        for q in questions
    ]
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def generation_rates(texts: list[str], questions: list[world.Question]) -> dict[str, float]:
    n = len(texts)
    core = [world.answer(q.topic, True, False) for q in questions]
    return {
        "greedy_polite": sum(map(world.is_polite, texts)) / n,
        "greedy_concise": sum(map(world.is_concise, texts)) / n,
        "greedy_correct_core": sum(t.strip().startswith(c) for t, c in zip(texts, core, strict=True)) / n,
    }


def parameter_change(model, base_state: dict[str, torch.Tensor]) -> float:
    total = 0.0
    for name, value in model.state_dict().items():
        if name in base_state:
            total += (value.float() - base_state[name].float()).pow(2).sum().item()
    return math.sqrt(total)


def measure(model, tokenizer, pairs: list[dict], questions: list[world.Question], base_state=None) -> dict:
    model.eval()
    lp = pair_logps(model, tokenizer, pairs)
    h_base = lp["base_chosen"] - lp["base_rejected"]
    h_pref = lp["guided_chosen"] - lp["guided_rejected"]
    texts = greedy_generations(model, tokenizer, questions)
    return {
        "pair_accuracy": (h_base > 0).float().mean().item(),
        "margin": h_base.mean().item(),
        "logp_chosen": lp["base_chosen"].mean().item(),
        "logp_rejected": lp["base_rejected"].mean().item(),
        "log_pref_advantage": (h_pref - h_base).mean().item(),
        "guided_pair_accuracy": (h_pref > 0).float().mean().item(),
        **polite_probability(model, tokenizer, questions),
        **{
            f"{key}_heldout_topics": value
            for key, value in polite_probability(model, tokenizer, [q for q in questions if q.held_out_topic]).items()
        },
        **generation_rates(texts, questions),
        "param_change": 0.0 if base_state is None else parameter_change(model, base_state),
        "sample_generation": texts[0],
    }
