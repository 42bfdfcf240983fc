"""Pretrain the benchmark's base model on the synthetic world (`world.py`): a tiny Qwen2 and its tokenizer.

Sequences are tokenized by the trainer's own `tokenize_views`, so the base model sees prompts, the
instruction and responses exactly as preference training will. Loss on response tokens only.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import torch

from preference_dpo.tiny_model import DEFAULT_SYSTEM_PROMPT, train_tokenizer

from . import world
from .encoding import right_pad, tokenize_rows

logger = logging.getLogger(__name__)

MODEL_SHAPE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}


def _tokenizer_corpus():
    for _ in range(4):
        yield DEFAULT_SYSTEM_PROMPT
        yield world.INSTRUCTION
    for q in world.all_questions():
        yield q.text
        for concise in (True, False):
            yield world.answer(q.topic, concise, True)


def build_tokenizer():
    return train_tokenizer(_tokenizer_corpus(), vocab_size=600)


def encode(tokenizer, rows) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) per (question, instructed, answer) row."""
    examples = [
        {
            "prompt": [{"role": "user", "content": q.text}],
            "chosen": [{"role": "assistant", "content": text}],
            "rejected": [{"role": "assistant", "content": text}],
        }
        for q, _, text in rows
    ]
    views = tokenize_rows(tokenizer, examples)
    return [
        (v["guided_prompt_ids"] if instructed else v["prompt_ids"], v["chosen_ids"])
        for v, (_, instructed, _) in zip(views, rows, strict=True)
    ]


def batches(encoded, batch_size: int, pad_id: int, rng: random.Random):
    order = list(range(len(encoded)))
    rng.shuffle(order)
    for start in range(0, len(order), batch_size):
        input_ids, attention, response = right_pad([encoded[i] for i in order[start : start + batch_size]], pad_id)
        yield input_ids, attention, torch.where(response, input_ids, -100)


def pretrain(output_dir: Path, examples: int = 12_000, epochs: int = 3, seed: int = 0) -> Path:
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    started = time.monotonic()
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    encoded = encode(tokenizer, world.pretraining_examples(examples, seed))
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        intermediate_size=MODEL_SHAPE["hidden_size"] * 3,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        **MODEL_SHAPE,
    )
    model = Qwen2ForCausalLM(config)
    steps = epochs * -(-len(encoded) // 32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.05)
    rng = random.Random(seed)
    model.train()
    step = 0
    for epoch in range(epochs):
        total, count = 0.0, 0
        for input_ids, attention, labels in batches(encoded, 32, tokenizer.pad_token_id, rng):
            loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            total, count, step = total + loss.item(), count + 1, step + 1
        logger.info(
            "pretraining epoch %d/%d: mean response loss %.4f (%d steps)", epoch + 1, epochs, total / count, step
        )
    model.generation_config = GenerationConfig(
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, max_new_tokens=48, do_sample=False
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    (output_dir / "pretraining.json").write_text(
        json.dumps(
            {
                "seconds": round(time.monotonic() - started, 1),
                "examples": examples,
                "epochs": epochs,
                "seed": seed,
                "steps": steps,
                **MODEL_SHAPE,
            }
        )
        + "\n"
    )
    logger.info("Base model (%d parameters) in %s", model.num_parameters(), output_dir)
    return output_dir
