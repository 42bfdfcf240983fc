"""What the real-model benchmark measures on SmolLM2, from generations and log-probs (no training here).

- Generations to the held-out questions WITHOUT any instruction, greedy and sampled: the share of answers each
  instruction's detector flags (`INSTRUCTIONS`), and the pairs' own trait, brevity (the share of one-sentence
  answers, and the mean word count).
- Capability: a factual set checked automatically (capitals of well-known countries; the answer must name
  the capital), and the mean per-token log-prob that the model, without the instruction, gives the answers
  the untrained model writes WITH the instruction (how well it now produces what the instruction asked for).

Every function takes a loaded model; `run.py` loads the base model and each trained adapter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bench.realmodel.detectors import is_french, share


def starts_with_hello(text: str) -> bool:
    return text.lstrip(" \"'*").lower().startswith("hello")


@dataclass(frozen=True)
class Instruction:
    name: str
    text: str
    position: str  # PREFERENCE_POSITION: where the tool (and `generate`) puts it
    detector: object


# Both have an effect the untrained model shows (probed before the benchmark was run: README, "A real chat
# model"); instructions it ignores ("Answer in capital letters only.", "Begin your answer with the word
# 'Certainly'.", "Answer with a numbered list.") cannot show a transfer and were not used.
INSTRUCTIONS = {
    "french": Instruction("french", "Answer in French.", "system", is_french),
    "hello": Instruction("hello", "Start your answer with 'Hello!'", "user", starts_with_hello),
}

# Capitals a 135M model knows in English; the check is a case-insensitive word match of the capital.
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "Greece": "Athens", "Portugal": "Lisbon",
    "Austria": "Vienna", "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Poland": "Warsaw", "Hungary": "Budapest", "Thailand": "Bangkok",
    "South Korea": "Seoul", "Argentina": "Buenos Aires", "Peru": "Lima", "Kenya": "Nairobi", "Cuba": "Havana",
    "the United Kingdom": "London", "Belgium": "Brussels", "the Netherlands": "Amsterdam", "Iran": "Tehran",
    "Indonesia": "Jakarta", "the Philippines": "Manila",
}  # fmt: skip


def fact_questions() -> list[tuple[str, str]]:
    return [(f"What is the capital of {country}?", capital) for country, capital in CAPITALS.items()]


def names(answer: str, capital: str) -> bool:
    return re.search(rf"\b{re.escape(capital)}\b", answer, re.IGNORECASE) is not None


def chat_texts(tokenizer, questions: list[str], instruction: Instruction | None) -> list[str]:
    """The prompts as the tool renders them: the template's default system message kept, the instruction
    (if any) where `instruction.position` says (`preference_dpo.instruction.insert_instruction`)."""
    from preference_dpo.instruction import insert_instruction, template_default_system

    default_system = template_default_system(tokenizer)
    texts = []
    for question in questions:
        messages = [{"role": "user", "content": question}]
        if instruction is not None:
            messages = insert_instruction(messages, instruction.text, instruction.position, default_system)
        texts.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    return texts


def generate(model, tokenizer, texts: list[str], max_new_tokens: int, sample_seed: int | None = None,
             temperature: float = 0.7, batch_size: int = 20) -> list[str]:  # fmt: skip
    """Greedy answers (`sample_seed` None) or one sampled answer each, `temperature`, seeded."""
    import torch

    tokenizer.padding_side = "left"
    answers = []
    generator_kwargs = {"do_sample": False}
    if sample_seed is not None:
        torch.manual_seed(sample_seed)
        generator_kwargs = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0}
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=False)  # fmt: skip
            out = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, **generator_kwargs)  # fmt: skip
            answers += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return [a.strip() for a in answers]


def answer_logp(model, tokenizer, texts: list[str], answers: list[str], batch_size: int = 10) -> float:
    """Mean over answers of the per-token log-prob of `answers[i]` (ended by the template's end of turn)
    after the prompt `texts[i]`."""
    import torch

    end = tokenizer.eos_token or ""
    rows = []
    for text, answer in zip(texts, answers, strict=True):
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        response = tokenizer(answer + end, add_special_tokens=False)["input_ids"]
        rows.append((prompt, response))
    means = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            width = max(len(p) + len(r) for p, r in chunk)
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            scored = torch.zeros((len(chunk), width), dtype=torch.bool)
            for i, (p, r) in enumerate(chunk):
                ids[i, : len(p) + len(r)] = torch.tensor(p + r)
                mask[i, : len(p) + len(r)] = 1
                scored[i, len(p) : len(p) + len(r)] = True
            logps = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), dim=-1)
            token = logps.gather(-1, ids[:, 1:, None]).squeeze(-1)
            target = scored[:, 1:]
            means += ((token * target).sum(1) / target.sum(1)).tolist()
    return sum(means) / len(means)


def sentences(answer: str) -> int:
    return max(1, len(re.findall(r"[.!?](?:\s|$)", answer.strip())))


@dataclass
class Measures:
    """One model's measures without the instruction (the base model's also with each instruction)."""

    greedy: dict[str, float]  # detector name -> share of the held-out answers
    sampled: dict[str, float]
    one_sentence: float  # the pairs' trait (greedy)
    words: float
    facts: float
    instructed_answer_logp: dict[str, float]  # instruction -> mean per-token logp of the instructed base's answers
    samples: list[str]


def measure(model, tokenizer, questions: list[str], reference_answers: dict[str, list[str]], seed: int,
            max_new_tokens: int, instruction: Instruction | None = None) -> Measures:  # fmt: skip
    """Every measure of `model` on `questions` (the held-out ones) and the factual set, prompted with
    `instruction` (None: without any, as the trained models are judged)."""
    texts = chat_texts(tokenizer, questions, instruction)
    greedy = generate(model, tokenizer, texts, max_new_tokens)
    sampled = generate(model, tokenizer, texts, max_new_tokens, sample_seed=seed)
    facts = fact_questions()
    fact_answers = generate(model, tokenizer, chat_texts(tokenizer, [q for q, _ in facts], instruction), 24)
    logp = {
        name: answer_logp(model, tokenizer, texts, answers) for name, answers in reference_answers.items()
    }  # fmt: skip
    return Measures(
        greedy={name: share(i.detector, greedy) for name, i in INSTRUCTIONS.items()},
        sampled={name: share(i.detector, sampled) for name, i in INSTRUCTIONS.items()},
        one_sentence=share(lambda a: sentences(a) == 1, greedy),
        words=sum(len(a.split()) for a in greedy) / len(greedy),
        facts=share(lambda qa: names(qa[0], qa[1]), list(zip(fact_answers, [c for _, c in facts], strict=True))),
        instructed_answer_logp=logp,
        samples=greedy[:3],
    )
