"""Preference pairs for SmolLM2 from prompts this project writes and the model's own answers (a brevity contrast).

For each question the model answers greedily, without any instruction, through its chat template (default
system message included); chosen = the first sentence of that answer, rejected = the whole answer. Answers of
one sentence give no contrast and are left out (counted). The pairs' trait, brevity, has nothing to do with an
instruction such as "Answer in French.", whose effect the aligned loss is meant to carry over.

Deterministic: fixed question list, greedy decoding, one thread (the weights and the question order decide
every token). Regenerate the committed files with

    python3 -m bench.realmodel.pairs --output_dir data/smollm2_pairs
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from pathlib import Path

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent.parent

# Open questions a small chat model answers in several sentences. Test subjects never occur in training.
TOPICS = {
    "train": [
        "sleep",
        "exercise",
        "drinking water",
        "recycling",
        "reading books",
        "learning a language",
        "saving money",
        "eating vegetables",
        "walking every day",
        "meditation",
        "friendship",
        "music lessons",
        "planting trees",
        "washing your hands",
        "wearing sunscreen",
        "taking breaks at work",
        "breakfast",
        "volunteering",
        "keeping a diary",
        "learning to cook",
        "stretching",
        "drinking tea",
        "board games",
        "visiting museums",
        "learning history",
        "public libraries",
        "bicycles",
        "composting",
        "bird watching",
        "solving puzzles",
        "writing letters",
        "gardening",
        "swimming",
        "yoga",
        "saving energy at home",
        "turning off screens before bed",
        "cleaning your desk",
        "learning to type",
        "camping",
        "painting",
        "making a budget",
        "brushing your teeth",
        "learning math",
        "playing chess",
        "going to the dentist",
    ],  # fmt: skip
    "test": [
        "running",
        "drawing",
        "learning to code",
        "hiking",
        "dancing",
        "taking photos",
        "knitting",
        "baking bread",
        "visiting parks",
        "learning to sing",
        "keeping plants indoors",
        "fishing",
        "learning geography",
        "writing poems",
        "riding a horse",
        "building models",
        "cycling to work",
        "learning about stars",
        "sewing",
        "rowing",
    ],  # fmt: skip
}
TEMPLATES = ("Why is {t} good for people?", "What should a beginner know about {t}?")


def questions(split: str) -> list[str]:
    return [template.format(t=topic) for topic in TOPICS[split] for template in TEMPLATES]


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def first_sentence(answer: str) -> str | None:
    """The answer's first sentence, or None if the answer is one sentence (or starts with a list)."""
    parts = _SENTENCE_END.split(answer.strip(), maxsplit=1)
    head = parts[0].strip()
    if len(parts) < 2 or len(head) < 15 or "\n" in head or not head.endswith((".", "!", "?")):
        return None
    return head


def generate(model, tokenizer, prompts: list[str], instruction: str | None = None, max_new_tokens: int = 64,
             batch_size: int = 16) -> list[str]:  # fmt: skip
    """Greedy answers to `prompts`, each a user turn; `instruction` (if any) goes after the template's default
    system text, as the trainer's guided view puts it (PREFERENCE_POSITION=system)."""
    import torch

    from preference_dpo.instruction import insert_instruction, template_default_system

    default_system = template_default_system(tokenizer)
    texts = []
    for question in prompts:
        messages = [{"role": "user", "content": question}]
        if instruction:
            messages = insert_instruction(messages, instruction, "system", default_system)
        texts.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    tokenizer.padding_side = "left"
    answers = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=False)  # fmt: skip
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
            answers += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return [a.strip() for a in answers]


def build_pairs(model, tokenizer, split: str, max_new_tokens: int = 64) -> tuple[list[dict], int]:
    """(pairs, answers left out) for one split."""
    prompts = questions(split)
    rows, left_out = [], 0
    for question, answer in zip(prompts, generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens),
                                strict=True):  # fmt: skip
        head = first_sentence(answer)
        if head is None:
            left_out += 1
            continue
        rows.append({
            "prompt": [{"role": "user", "content": question}],
            "chosen": [{"role": "assistant", "content": head}],
            "rejected": [{"role": "assistant", "content": answer}],
        })  # fmt: skip
    return rows, left_out


def main(argv: list[str] | None = None) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from preference_dpo.presets import resolve

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="A folder, or `smollm2` (built once).")
    parser.add_argument("--output_dir", type=Path, default=REPO / "data" / "smollm2_pairs")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)  # the same tokens on every machine's core count
    folder = resolve(args.model, "--model")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        started = time.monotonic()
        rows, left_out = build_pairs(model, tokenizer, split, args.max_new_tokens)
        with open(args.output_dir / f"{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        logger.info("%s: %d pairs, %d one-sentence answers left out (%.0f s)", split, len(rows), left_out,
                    time.monotonic() - started)  # fmt: skip


if __name__ == "__main__":
    main()
