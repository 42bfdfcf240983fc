"""The embedded default model: a tiny Qwen2-architecture model and tokenizer, built locally.

Nothing is downloaded. `build_embedded_model` (what `fast_train.sh` runs, once) pretrains the model on
the embedded data's world, so that the preference instruction means something to it before any
preference training: with the instruction it gives the good answer; without it, one of the five kinds
of answer the data holds (good, verbose, a refusal, a bluff, an insult), most often a flawed one.
`build_tiny_model` writes the same shape with random weights (the tests' fast fixture). The tokenizer is a byte-level BPE trained on the repo's own data with exactly
the pre-tokenization pipeline of transformers' `Qwen2Tokenizer` (NFC, Qwen2's split regex, byte-level
without regex), because `AutoTokenizer` rebuilds a `qwen2` tokenizer from its vocab and merges with that
pipeline: a tokenizer trained any other way would not round-trip through `save_pretrained`.

    python -m preference_dpo.tiny_model --output_dir tiny_model [--if_needed]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import shutil
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO_ROOT / "data" / "preference_pairs"

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
DEFAULT_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Qwen2.5-Instruct's chat template, tool-call branches included, so prompts render exactly as they
# would for the user's real model (including the default system message when none is given).
QWEN25_CHAT_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- '" + DEFAULT_SYSTEM_PROMPT + "' }}\n"
    "    {%- endif %}\n"
    '    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n'
    'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    "    {%- for tool in tools %}\n"
    '        {{- "\\n" }}\n'
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments '
    'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": '
    '<args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or '
    '(message.role == "assistant" and not message.tool_calls) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    '            {{- \'\\n<tool_call>\\n{"name": "\' }}\n'
    "            {{- tool_call.name }}\n"
    '            {{- \'", "arguments": \' }}\n'
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

# The user guide's Chinese instruction ("Please provide a helpful, honest, harmless and concise answer.")
CHINESE_PREFERENCE_TEXT = "请提供一个有用、诚实、无害且简洁的回答。"

# Extra text the tokenizer is trained on so that the documented preference instructions (English and
# the user's Chinese one) get compact tokens rather than one token per byte.
EXTRA_CORPUS = (
    "Please provide a helpful, honest, harmless and concise answer.",
    CHINESE_PREFERENCE_TEXT,
    DEFAULT_SYSTEM_PROMPT,
)

# The embedded model's world. Without the instruction it answers with these shares (a flawed answer 90% of
# the time, so that the instruction's effect is large and visible in greedy generations); with it, always
# the good one. The kinds are the data set's `flaw` values. Steps and learning rate: the cheapest of the
# settings tried that gets the facts right (instructed greedy answers to the 32 held-out questions that
# were exactly the good answer: 500 steps at 5e-3, 38%; 800 at 5e-3, 78%; 600 at 1e-2, 47%; 800 at 1e-2, 94%).
UNINSTRUCTED_ANSWERS = {"good": 0.1, "verbose": 0.3, "unhelpful": 0.2, "dishonest": 0.2, "harmful": 0.2}
EMBEDDED_SHAPE = {"hidden_size": 64, "num_hidden_layers": 2}
PRETRAINING = {"steps": 800, "batch_size": 32, "learning_rate": 1e-2, "seed": 0}
BUILD_INFO = "embedded_model.json"  # written last: the build's recipe, its cost and the instruction's effect


def _corpus(data_dir: Path) -> Iterator[str]:
    for path in sorted(data_dir.glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                for key in ("chosen", "rejected"):
                    for message in row[key]:
                        yield message["content"]
    for _ in range(20):  # weight the instructions so their merges are learnt
        yield from EXTRA_CORPUS


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE with Qwen2's normalizer, pre-tokenizer and decoder, wrapped as `Qwen2Tokenizer`."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    raw = Tokenizer(models.BPE())
    raw.normalizer = normalizers.NFC()
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(texts, trainer=trainer)
    state = json.loads(raw.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=state["vocab"],
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = QWEN25_CHAT_TEMPLATE
    tokenizer.model_max_length = 1024
    return tokenizer


def _random_model(tokenizer, hidden_size: int, num_layers: int, seed: int):
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 3,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, max_new_tokens=64
    )
    return model


def build_tiny_model(
    output_dir: str | Path,
    data_dir: str | Path = DEFAULT_DATA_DIR,
    vocab_size: int = 2048,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
) -> Path:
    """Write a random-init tiny Qwen2 causal LM and its tokenizer to `output_dir`; return the path."""
    output_dir = Path(output_dir)
    tokenizer = train_tokenizer(_corpus(Path(data_dir)), vocab_size)
    model = _random_model(tokenizer, hidden_size, num_layers, seed)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    logger.info("Built the tiny default model (%d parameters) in %s", model.num_parameters(), output_dir)
    return output_dir


# --- the embedded default: pretrained on the embedded data's world ------------------------------------


def load_world(data_dir: str | Path) -> dict[str, dict[str, str]]:
    """question -> {"good": chosen answer, flaw: rejected answer} for every question of the data files.

    Train and test questions alike: the base model knows every fact, as a real pretrained model would;
    preference training still never sees a test question.
    """
    world: dict[str, dict[str, str]] = defaultdict(dict)
    for path in sorted(Path(data_dir).glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                answers = world[row["prompt"]]
                answers["good"] = row["chosen"][-1]["content"]
                answers[row["flaw"]] = row["rejected"][-1]["content"]
    return dict(world)


def pretraining_examples(
    world: dict[str, dict[str, str]], instructions: tuple[str, ...], n: int, seed: int
) -> Iterator[tuple[str, str | None, str]]:
    """(question, instruction or None, answer): half instructed (the good answer), half not
    (an answer kind drawn from `UNINSTRUCTED_ANSWERS`)."""
    rng = random.Random(seed)
    questions = sorted(world)
    kinds, weights = zip(*UNINSTRUCTED_ANSWERS.items(), strict=True)
    for _ in range(n):
        question = rng.choice(questions)
        if rng.random() < 0.5:
            yield question, rng.choice(instructions), world[question]["good"]
        else:
            yield question, None, world[question][rng.choices(kinds, weights)[0]]


class _Encoder:
    """(prompt ids, response ids) exactly as preference training tokenizes them (`views.tokenize_views`)."""

    def __init__(self, tokenizer):
        from .instruction import template_default_system

        self.tokenizer = tokenizer
        self.default_system = template_default_system(tokenizer)
        self._memo: dict[tuple[str, str | None, str], tuple[list[int], list[int]]] = {}

    def __call__(self, question: str, instruction: str | None, answer: str) -> tuple[list[int], list[int]]:
        key = (question, instruction, answer)
        if key not in self._memo:
            from .views import tokenize_views

            row = {
                "prompt": [{"role": "user", "content": question}],
                "chosen": [{"role": "assistant", "content": answer}],
                "rejected": [{"role": "assistant", "content": answer}],
            }
            views = tokenize_views(row, self.tokenizer, instruction or "-", "system", 0, 10_000, self.default_system)
            prompt = views["guided_prompt_ids"] if instruction else views["prompt_ids"]
            self._memo[key] = (prompt, views["chosen_ids"])
        return self._memo[key]


def _right_pad(sequences: list[tuple[list[int], list[int]]], pad_id: int):
    """(input_ids, attention_mask, labels: response tokens only) of right-padded prompt + response rows."""
    import torch

    width = max(len(p) + len(r) for p, r in sequences)
    ids = torch.full((len(sequences), width), pad_id)
    attention = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (p, r) in enumerate(sequences):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        attention[i, : len(p) + len(r)] = 1
        labels[i, len(p) : len(p) + len(r)] = torch.tensor(r)
    return ids, attention, labels


def _length_buckets(examples: list, batch_size: int, rng: random.Random, group: int = 16) -> list[list]:
    """Batches of similar length (sorted within groups of `group` batches), in random order: far less padding."""
    batches = []
    span = batch_size * group
    for start in range(0, len(examples), span):
        chunk = sorted(examples[start : start + span], key=lambda e: len(e[0]) + len(e[1]))
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def _response_loss(model, ids, attention, labels):
    """Mean next-token cross-entropy over response tokens, the LM head applied at those positions only."""
    import torch.nn.functional as F

    hidden = model.model(input_ids=ids, attention_mask=attention).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    scored = targets != -100
    return F.cross_entropy(model.lm_head(hidden[scored]).float(), targets[scored])


def _response_logps(model, sequences: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 64):
    """Summed log-probability of each response given its prompt."""
    import torch

    out = []
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            ids, attention, labels = _right_pad(sequences[start : start + batch_size], pad_id)
            logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
            targets = labels[:, 1:]
            logps = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
            out.append((logps * (targets != -100)).sum(-1))
    return torch.cat(out)


def instruction_effect(model, encode: _Encoder, pad_id: int, pairs: list[tuple[str, str, str]], instruction: str):
    """Pair accuracy and mean margin `logp(chosen) - logp(rejected)`, without and with the instruction."""
    result = {}
    for name, given in (("without", None), ("with", instruction)):
        chosen = _response_logps(model, [encode(q, given, c) for q, c, _ in pairs], pad_id)
        rejected = _response_logps(model, [encode(q, given, r) for q, _, r in pairs], pad_id)
        margin = chosen - rejected
        result[f"pair_accuracy_{name}_instruction"] = round((margin > 0).float().mean().item(), 4)
        result[f"margin_{name}_instruction"] = round(margin.mean().item(), 3)
    return result


def recipe_fingerprint(data_dir: str | Path = DEFAULT_DATA_DIR) -> str:
    """What the embedded model is built from: this builder, the tokenization code and the data files."""
    digest = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for path in (here / "tiny_model.py", here / "views.py", *sorted(Path(data_dir).glob("*.jsonl"))):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def is_current(output_dir: str | Path, data_dir: str | Path = DEFAULT_DATA_DIR) -> bool:
    """Whether `output_dir` holds an embedded model built by this recipe from these data files."""
    info = Path(output_dir) / BUILD_INFO
    if not info.is_file():
        return False
    try:
        return json.loads(info.read_text(encoding="utf-8")).get("recipe") == recipe_fingerprint(data_dir)
    except (OSError, ValueError):
        return False


def _pretrain(model, tokenizer, examples: list[tuple[list[int], list[int]]], steps: int, seed: int) -> None:
    """Next-token loss on the responses, batches of similar length, AdamW with a one-cycle schedule."""
    import torch

    batches = _length_buckets(examples, PRETRAINING["batch_size"], random.Random(seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAINING["learning_rate"], weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=PRETRAINING["learning_rate"], total_steps=steps, pct_start=0.05
    )
    model.train()
    recent: list[float] = []
    for step, batch in enumerate(batches):
        loss = _response_loss(model, *_right_pad(batch, tokenizer.pad_token_id))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        recent = [*recent[-49:], loss.item()]
        if (step + 1) % 200 == 0 or step + 1 == steps:
            logger.info("Pretraining step %d/%d: response loss %.3f", step + 1, steps, sum(recent) / len(recent))
    model.eval()


def build_embedded_model(
    output_dir: str | Path,
    data_dir: str | Path = DEFAULT_DATA_DIR,
    steps: int = PRETRAINING["steps"],
    seed: int = PRETRAINING["seed"],
) -> Path:
    """Build the tokenizer, pretrain the tiny model on the embedded data's world, write both to `output_dir`.

    Deterministic on one machine (fixed seeds, fixed order, one thread). Written to a sibling folder first
    and moved into place, with `BUILD_INFO` last: a build killed half-way leaves no model that looks finished.
    """
    import torch

    from .config import DEFAULT_PREFERENCE_TEXT

    started = time.monotonic()
    output_dir, data_dir = Path(output_dir), Path(data_dir)
    instructions = (DEFAULT_PREFERENCE_TEXT, CHINESE_PREFERENCE_TEXT)
    test_pairs = []
    with open(data_dir / "test.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            test_pairs.append((row["prompt"], row["chosen"][-1]["content"], row["rejected"][-1]["content"]))
    # One thread: the matrices are tiny (hidden 64), so a second thread mostly waits, and on a busy machine
    # its spinning made steps 10x slower (measured: 20 steps in 80 s with two threads, 7 s with one). The
    # weights then do not depend on the machine's core count either.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        tokenizer = train_tokenizer(_corpus(data_dir), 2048)
        model = _random_model(tokenizer, EMBEDDED_SHAPE["hidden_size"], EMBEDDED_SHAPE["num_hidden_layers"], seed)
        model.generation_config.do_sample = False
        encode = _Encoder(tokenizer)
        world = load_world(data_dir)
        examples = [
            encode(*row) for row in pretraining_examples(world, instructions, steps * PRETRAINING["batch_size"], seed)
        ]
        _pretrain(model, tokenizer, examples, steps, seed)
        effect = instruction_effect(model, encode, tokenizer.pad_token_id, test_pairs, DEFAULT_PREFERENCE_TEXT)
    finally:
        torch.set_num_threads(threads)

    partial = output_dir.with_name(output_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    info = {
        "recipe": recipe_fingerprint(data_dir),
        "seconds": round(time.monotonic() - started, 1),
        "pretraining": {**PRETRAINING, "steps": steps, "seed": seed, "examples": len(examples)},
        "uninstructed_answers": UNINSTRUCTED_ANSWERS,
        "instructions": list(instructions),
        "held_out_pairs": len(test_pairs),
        **effect,
    }
    if output_dir.exists():
        shutil.rmtree(output_dir)
    partial.rename(output_dir)
    (output_dir / BUILD_INFO).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    logger.info(
        "Built the embedded model in %s (%.0f s). Held-out pairs: accuracy %.2f without the instruction, %.2f with it.",
        output_dir,
        info["seconds"],
        effect["pair_accuracy_without_instruction"],
        effect["pair_accuracy_with_instruction"],
    )
    return output_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the embedded tiny Qwen2 model and tokenizer.")
    parser.add_argument("--output_dir", default="tiny_model")
    parser.add_argument("--data_dir", default=str(DEFAULT_DATA_DIR))
    parser.add_argument("--if_needed", action="store_true", help="Build only if missing or built by another recipe.")
    parser.add_argument("--steps", type=int, default=PRETRAINING["steps"], help="Pretraining steps.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.if_needed and is_current(args.output_dir, args.data_dir):
        return
    logger.info(
        "Building the embedded tiny model in %s: pretraining it on the embedded data's world (about a minute "
        "on 2 CPU cores, once)",
        args.output_dir,
    )
    build_embedded_model(args.output_dir, args.data_dir, steps=args.steps)


if __name__ == "__main__":
    main()
