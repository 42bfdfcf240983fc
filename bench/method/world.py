"""A synthetic world where the preference instruction has two known, independent effects.

Every answer is a core sentence about a topic, then two optional parts:
- trait one, *concise*: without it the core is followed by two filler sentences;
- trait two, *polite*: the answer ends with "Hope this helps!".
With the instruction (`INSTRUCTION`, in the system message exactly as the trainer inserts it) both
traits always hold; without it each holds with probability 1/2, independently. A tiny model pretrained
on this corpus therefore follows the instruction and, without it, flips two fair coins.

Preference pairs contrast only trait one (chosen concise, rejected verbose); trait two is drawn at
random in chosen and rejected alike, so the pairs carry no signal about it. Whether training makes the
un-instructed model polite is then a direct test of whether the instruction's *other* effect transfers.

Topics and question templates are split: pairs are built from the train topics' train templates; the
evaluation uses held-out templates on train topics and every template on held-out topics.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

INSTRUCTION = "Please answer concisely and politely."
POLITE_ENDING = " Hope this helps!"

# topic: three attributes (the core sentence uses the first two, the filler the third)
TOPICS = {
    "the ocean": ("deep", "salty", "blue"),
    "the desert": ("dry", "hot", "sandy"),
    "a volcano": ("tall", "dangerous", "active"),
    "the moon": ("bright", "distant", "cold"),
    "a forest": ("green", "quiet", "dense"),
    "a river": ("long", "fast", "fresh"),
    "the city": ("busy", "loud", "crowded"),
    "a glacier": ("frozen", "slow", "ancient"),
    "a garden": ("small", "colorful", "calm"),
    "the sun": ("hot", "huge", "bright"),
    "a mountain": ("high", "rocky", "steep"),
    "an island": ("remote", "sunny", "green"),
    "a library": ("quiet", "large", "old"),
    "the market": ("crowded", "noisy", "cheap"),
    "a cave": ("dark", "damp", "narrow"),
    "the sky": ("wide", "blue", "open"),
    "a lake": ("still", "clear", "cold"),
    "the jungle": ("humid", "wild", "thick"),
    "a bridge": ("long", "strong", "narrow"),
    "the castle": ("old", "stone", "grand"),
    "a meadow": ("open", "green", "soft"),
    "the harbor": ("busy", "windy", "deep"),
    "a canyon": ("deep", "red", "wide"),
    "the tundra": ("cold", "flat", "empty"),
}
HELD_OUT_TOPICS = ("a lake", "the jungle", "a bridge", "the castle", "a meadow", "the harbor", "a canyon", "the tundra")
TEMPLATES = (
    "What is {t} like?",
    "Tell me about {t}.",
    "What do you know about {t}?",
    "Describe {t} for me.",
    "Can you explain {t}?",
    "Give me some facts about {t}.",
)
HELD_OUT_TEMPLATES = (4, 5)


def answer(topic: str, concise: bool, polite: bool) -> str:
    a1, a2, a3 = TOPICS[topic]
    text = f"{topic[0].upper()}{topic[1:]} is {a1} and {a2}."
    if not concise:
        text += f" Many people also say that {topic} is {a3}. There is much more to say about {topic}, and it depends on who you ask."
    if polite:
        text += POLITE_ENDING
    return text


def is_concise(text: str) -> bool:
    return "Many people" not in text


def is_polite(text: str) -> bool:
    return text.rstrip().endswith(POLITE_ENDING.strip())


@dataclass(frozen=True)
class Question:
    topic: str
    template: int

    @property
    def text(self) -> str:
        return TEMPLATES[self.template].format(t=self.topic)

    @property
    def held_out_topic(self) -> bool:
        return self.topic in HELD_OUT_TOPICS


def train_questions() -> list[Question]:
    return [
        Question(t, i)
        for t in TOPICS
        if t not in HELD_OUT_TOPICS
        for i in range(len(TEMPLATES))
        if i not in HELD_OUT_TEMPLATES
    ]


def eval_questions() -> list[Question]:
    """Held-out templates on train topics, then every template on held-out topics."""
    seen_topics = [Question(t, i) for t in TOPICS if t not in HELD_OUT_TOPICS for i in HELD_OUT_TEMPLATES]
    new_topics = [Question(t, i) for t in HELD_OUT_TOPICS for i in range(len(TEMPLATES))]
    return seen_topics + new_topics


def all_questions() -> list[Question]:
    return [Question(t, i) for t in TOPICS for i in range(len(TEMPLATES))]


def pretraining_examples(n: int, seed: int) -> list[tuple[Question, bool, str]]:
    """(question, instructed, answer): half instructed (both traits), half not (two fair coins).

    Covers every topic and template, so the model knows every fact; only the behaviour is learnt later.
    """
    rng = random.Random(seed)
    questions = all_questions()
    rows = []
    for _ in range(n):
        q = rng.choice(questions)
        instructed = rng.random() < 0.5
        concise, polite = (True, True) if instructed else (rng.random() < 0.5, rng.random() < 0.5)
        rows.append((q, instructed, answer(q.topic, concise, polite)))
    return rows


def preference_pairs(questions: list[Question], per_question: int, seed: int) -> list[dict]:
    """Conversational pairs, chosen concise and rejected verbose, trait two drawn at random in each."""
    rng = random.Random(seed)
    rows = []
    for q in questions:
        for _ in range(per_question):
            rows.append(
                {
                    "prompt": [{"role": "user", "content": q.text}],
                    "chosen": [{"role": "assistant", "content": answer(q.topic, True, rng.random() < 0.5)}],
                    "rejected": [{"role": "assistant", "content": answer(q.topic, False, rng.random() < 0.5)}],
                }
            )
    rng.shuffle(rows)
    return rows
