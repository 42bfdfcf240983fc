"""ALIGN_LOSS=context_distill (`preference_dpo/forms/context.py`): the frozen reference's greedy answers WITH the
instruction, precomputed once, and the KL from the instructed reference to the un-instructed policy on them,
checked against model calls made here, one pair at a time, without the trainer's batching."""

from __future__ import annotations

import pytest
import torch

from .test_trl_contract import first_batch, make_trainer, perturb_adapter

TOKENS = 8  # the answers' length bound: short, so the tiny model's answers are often cut rather than ended


@pytest.fixture(scope="module")
def varied_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with noise on every weight matrix: the built one, near its random start, answers every prompt
    with the same token, which would not tell one prompt's answer from another's."""
    import shutil

    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("varied_model")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.add_(torch.randn(param.shape, generator=gen) * 0.3)
    model.save_pretrained(folder)
    for tokenizer_file in tiny_model_dir.iterdir():
        if not (folder / tokenizer_file.name).exists() and tokenizer_file.is_file():
            shutil.copy(tokenizer_file, folder / tokenizer_file.name)
    return folder


def context_trainer(model_dir, tokenizer, small_data, tmp_path, **overrides):
    return make_trainer(model_dir, tokenizer, small_data, tmp_path, alpha=1.0, align_loss="context_distill",
                        on_policy_max_new_tokens=TOKENS, **overrides)  # fmt: skip


def greedy_answer(model, prompt: list[int], eos: int) -> list[int]:
    """One prompt, unpadded: the model's greedy answer up to and including its first end-of-sequence token."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=TOKENS, do_sample=False,
                             pad_token_id=eos, eos_token_id=eos)[0, len(prompt):].tolist()  # fmt: skip
    return out[: out.index(eos) + 1] if eos in out else out


def test_the_answers_are_the_references_own_greedy_answers_with_the_instruction(
    varied_model_dir, tokenizer, small_data, tmp_path
):
    """Batched, left-padded generation gives each prompt the answer it gets alone, after its guided prompt (the
    instruction in it); the test split gets its own answers."""
    from transformers import AutoModelForCausalLM

    trainer = context_trainer(varied_model_dir, tokenizer, small_data, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(varied_model_dir).eval()  # the reference: LoRA off = base weights
    eos = tokenizer.eos_token_id
    for data in (trainer.train_dataset, trainer.eval_dataset):
        rows = data.select(range(6))
        for row in rows:
            assert row["guided_prompt_ids"] != row["prompt_ids"]
            assert row["context_answer_ids"] == greedy_answer(model, row["guided_prompt_ids"], eos)
        assert len({tuple(r["context_answer_ids"]) for r in rows}) > 1  # not one answer for every prompt
        assert all(0 < len(r["context_answer_ids"]) <= TOKENS for r in rows)


def test_the_loss_is_the_summed_kl_from_the_instructed_reference_on_its_answers(
    varied_model_dir, tokenizer, small_data, tmp_path
):
    """The form's loss on a batch is the mean over its pairs of sum_t KL(reference(.|guided prompt, a_<t) ||
    policy(.|prompt, a_<t)) over the precomputed answer a; ALPHA 1 adds it to DPO's loss, and its gradient
    reaches the adapter."""
    trainer = context_trainer(varied_model_dir, tokenizer, small_data, tmp_path)
    perturb_adapter(trainer)
    batch, _ = first_batch(trainer)
    loss = trainer.compute_loss(trainer.model, batch)
    logged = trainer._metrics["train"]
    model = trainer.model

    def answer_logits(prompt, answer):
        logits = model(input_ids=torch.tensor([prompt + answer])).logits[0]
        return logits[len(prompt) - 1 : len(prompt) + len(answer) - 1]

    sums = []
    for i in range(4):
        row = trainer.train_dataset[i]
        answer = row["context_answer_ids"]
        with torch.no_grad():
            student = answer_logits(row["prompt_ids"], answer)
            with model.disable_adapter():
                teacher = answer_logits(row["guided_prompt_ids"], answer)
        t, s = teacher.log_softmax(-1), student.log_softmax(-1)
        sums.append((t.exp() * (t - s)).sum().item())
    expected = sum(sums) / len(sums)
    assert expected > 1e-4  # the instruction and the adapter make a difference to measure
    assert logged["context_distill_loss"][-1] == pytest.approx(expected, rel=1e-4)
    assert logged["aligned_loss"][-1] == pytest.approx(expected, rel=1e-4)
    assert loss.item() - logged["dpo_loss"][-1] == pytest.approx(expected, rel=1e-4, abs=1e-5)

    trainer.model.zero_grad()
    aligned_only = trainer.compute_loss(trainer.model, batch) - logged["dpo_loss"][-1]
    aligned_only.backward()
    grads = [
        p.grad.abs().sum().item() for n, p in trainer.model.named_parameters() if "lora_" in n and p.grad is not None
    ]
    assert grads and max(grads) > 0


def test_a_rerun_reuses_the_answers_and_generates_nothing(
    varied_model_dir, tokenizer, small_data, tmp_path, monkeypatch
):
    """The answers are cached beside the data set, keyed on the reference and the length bound: a second trainer on
    the same data runs no generation, and another bound generates again."""
    from transformers import GenerationMixin

    first = context_trainer(varied_model_dir, tokenizer, small_data, tmp_path / "a", cache_dir=str(tmp_path / "cache"))
    answers = first.train_dataset["context_answer_ids"]
    calls = []
    generate = GenerationMixin.generate

    def counted(self, *args, **kwargs):
        calls.append(1)
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", counted)
    again = context_trainer(varied_model_dir, tokenizer, small_data, tmp_path / "b", cache_dir=str(tmp_path / "cache"))
    assert calls == [] and again.train_dataset["context_answer_ids"] == answers
    other = make_trainer(varied_model_dir, tokenizer, small_data, tmp_path / "c", alpha=1.0, align_loss="context_distill",
                         on_policy_max_new_tokens=TOKENS - 4, cache_dir=str(tmp_path / "cache"))  # fmt: skip
    assert calls and all(len(a) <= TOKENS - 4 for a in other.train_dataset["context_answer_ids"])


def test_embedding_mode_answers_after_the_soft_prompt(varied_model_dir, tokenizer, small_data, tmp_path):
    """In embedding mode the guided prompt ends in the soft tokens: each answer is the reference's greedy answer
    after that prompt's embeddings, the placeholders replaced by the soft prompt."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(varied_model_dir).eval()
    soft = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(1)) * 0.5
    trainer = context_trainer(varied_model_dir, tokenizer, small_data, tmp_path, soft=soft)
    eos = tokenizer.eos_token_id
    rows = trainer.train_dataset.select(range(4))
    for row in rows:
        embeds = model.get_input_embeddings()(torch.tensor([row["guided_prompt_ids"]])).detach()
        embeds[0, -3:] = soft
        with torch.no_grad():
            out = model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                 max_new_tokens=TOKENS, do_sample=False, pad_token_id=eos, eos_token_id=eos)[0].tolist()  # fmt: skip
        assert row["context_answer_ids"] == (out[: out.index(eos) + 1] if eos in out else out)
    plain = context_trainer(varied_model_dir, tokenizer, small_data, tmp_path / "text")
    assert rows["context_answer_ids"] != plain.train_dataset.select(range(4))["context_answer_ids"]
