"""ALIGN_LOSS=ref_distill: exact and with the precomputed top-K teacher, against independent computations.

The independent side: plain forwards of the policy (base view) and of a fresh copy of the base model (the
reference: the policy with its adapter off) on whole guided sequences, full logits, log_softmax, and the KL
written out here, not taken from `preference_dpo.losses`.
"""

import pytest
import torch

from preference_dpo.config import parse_args
from preference_dpo.errors import UserInputError

from .conftest import EMBEDDED_TEST, EMBEDDED_TRAIN, head_rows, write_jsonl
from .test_trl_contract import (
    assert_same_gradients,
    base_logps,
    dpo,
    first_batch,
    guided_logps,
    make_trainer,
    perturb_adapter,
    training_loss,
)

ALPHA = 0.5


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """8 train and 4 test pairs: the top-K store of a whole-vocabulary teacher stays small."""
    folder = tmp_path_factory.mktemp("pairs")
    return (
        write_jsonl(folder / "train.jsonl", head_rows(EMBEDDED_TRAIN, 8)),
        write_jsonl(folder / "test.jsonl", head_rows(EMBEDDED_TEST, 4)),
    )


def reference_logits(tiny_model_dir, full):
    """The frozen reference's next-token logits on whole guided sequences, and the response positions."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        logits = reference(input_ids=full["guided_input_ids"], attention_mask=full["guided_attention_mask"]).logits
    return logits[:, :-1], full["guided_completion_mask"][:, 1:].bool(), reference


def expected_ref_distill(model, batch, teacher_logits, teacher_mask, reduction):
    """KL(pi_ref(.|p,x,y<t) || pi_theta(.|x,y<t)) at every response position, reduced by hand."""
    student_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask = batch["completion_mask"][:, 1:].bool()
    assert torch.equal(mask.sum(1), teacher_mask.sum(1))  # both views score the same response tokens
    log_q = torch.log_softmax(teacher_logits[teacher_mask].double(), -1)
    log_s = torch.log_softmax(student_logits[mask].double(), -1)
    per_token = (log_q.exp() * (log_q - log_s)).sum(-1)
    if reduction == "token_mean":
        return per_token.mean()
    sums = [chunk.sum() for chunk in per_token.split(mask.sum(1).tolist())]
    return torch.stack(sums).mean()


def test_exact_ref_distill_matches_an_independent_kl_against_the_frozen_reference(
    tiny_model_dir, tokenizer, pairs, tmp_path
):
    trainer = make_trainer(tiny_model_dir, tokenizer, pairs, tmp_path, alpha=ALPHA, align_loss="ref_distill")
    perturb_adapter(trainer)  # the policy differs from the reference
    batch, full = first_batch(trainer)
    teacher_logits, teacher_mask, reference = reference_logits(tiny_model_dir, full)
    with torch.no_grad():
        ref_chosen, ref_rejected = guided_logps(reference, full)
    for reduction in ("token_mean", "sequence_sum"):
        trainer.args.distill_reduction = reduction
        model, loss = training_loss(trainer, batch)
        kl = expected_ref_distill(model, batch, teacher_logits, teacher_mask, reduction)
        chosen, rejected = base_logps(model, batch)
        expected = dpo(trainer, chosen, rejected, batch["ref_chosen_logps"], batch["ref_rejected_logps"]) + ALPHA * kl
        assert kl.item() > 1e-3  # the instruction and the adapter change the distribution: a real signal
        assert trainer._metrics["train"]["ref_distill_loss"][-1] == pytest.approx(kl.item(), rel=1e-4), reduction
        assert loss.item() == pytest.approx(expected.item(), rel=1e-4), reduction
        assert_same_gradients(loss, expected.float(), model, rtol=1e-3, atol=1e-6)
    # aligned_active_frac compares h_base with the reference's instructed margin, not the policy's
    active = ((ref_chosen - ref_rejected) > (chosen - rejected).detach()).float().mean().item()
    assert trainer._metrics["train"]["aligned_active_frac"][-1] == pytest.approx(active)
    assert "pref_advantage_ratio" not in trainer._metrics["train"]  # no guided forward of the policy in training


def test_exact_ref_distill_with_a_separate_reference_model_uses_its_forward_and_lm_head(
    tiny_model_dir, tokenizer, pairs, tmp_path
):
    """REFERENCE_MODEL_PATH: the teacher is that model (other weights, its own LM head), not the adapter off."""
    from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

    torch.manual_seed(7)
    reference = Qwen2ForCausalLM(AutoModelForCausalLM.from_pretrained(tiny_model_dir).config).eval()
    trainer = make_trainer(
        tiny_model_dir, tokenizer, pairs, tmp_path, alpha=ALPHA, align_loss="ref_distill", ref_model=reference
    )
    batch, full = first_batch(trainer)
    with torch.no_grad():
        logits = reference(input_ids=full["guided_input_ids"], attention_mask=full["guided_attention_mask"]).logits
        model, _ = training_loss(trainer, batch)
        kl = expected_ref_distill(
            model, batch, logits[:, :-1], full["guided_completion_mask"][:, 1:].bool(), "token_mean"
        )
    assert trainer._metrics["train"]["ref_distill_loss"][-1] == pytest.approx(kl.item(), rel=1e-4)


def test_topk_teacher_over_the_whole_vocabulary_equals_the_exact_form_without_a_teacher_forward(
    tiny_model_dir, tokenizer, pairs, tmp_path
):
    from preference_dpo.trainer import capture_outputs

    vocab = trainer_vocab(tiny_model_dir)
    trainer = make_trainer(
        tiny_model_dir, tokenizer, pairs, tmp_path, alpha=ALPHA, align_loss="ref_distill", distill_top_k=vocab,
        distill_reduction="sequence_sum",
    )  # fmt: skip
    perturb_adapter(trainer)
    batch, full = first_batch(trainer)
    assert batch["guided_teacher_ids"].shape[1] == vocab
    teacher_logits, teacher_mask, _ = reference_logits(tiny_model_dir, full)
    model = trainer.model
    model.train()
    with capture_outputs(trainer._unwrapped(model)[1].base_model, fused_only=False) as backbone_forwards:
        loss = trainer.compute_loss(model, batch)
    assert len(backbone_forwards) == 1  # TRL's base-view forward only: the teacher was read from the store
    kl = expected_ref_distill(model, batch, teacher_logits, teacher_mask, "sequence_sum")
    chosen, rejected = base_logps(model, batch)
    expected = dpo(trainer, chosen, rejected, batch["ref_chosen_logps"], batch["ref_rejected_logps"]) + ALPHA * kl
    assert trainer._metrics["train"]["aligned_loss"][-1] == pytest.approx(kl.item(), rel=1e-4)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert_same_gradients(loss, expected.float(), model, rtol=1e-3, atol=1e-6)


def trainer_vocab(tiny_model_dir) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(tiny_model_dir).vocab_size


def test_teacher_store_holds_the_reference_top_k_and_resumes_after_a_kill(
    tiny_model_dir, tokenizer, pairs, tmp_path, monkeypatch
):
    """Rows equal the reference's top-K of an independent forward; a rerun computes only missing shards."""
    from preference_dpo import teacher as teacher_module

    monkeypatch.setattr(teacher_module, "SHARD_PAIRS", 3)  # 8 pairs: shards of 3, 3 and 2
    # CACHE=false: the store is the run's own (in the cache: the next test)
    settings = {"alpha": ALPHA, "align_loss": "ref_distill", "distill_top_k": 8, "cache": False}
    trainer = make_trainer(tiny_model_dir, tokenizer, pairs, tmp_path, **settings)
    (store,) = (tmp_path / "out" / teacher_module.TEACHER_DIR).glob("train-*")
    shards = sorted(store.glob("shard-*.arrow"))
    assert [p.name for p in shards] == ["shard-00000.arrow", "shard-00001.arrow", "shard-00002.arrow"]

    _, full = first_batch(trainer, n=1)
    teacher_logits, teacher_mask, reference = reference_logits(tiny_model_dir, full)
    log_q = torch.log_softmax(teacher_logits[0][teacher_mask[0]], -1)  # pair 0, chosen response
    want_logps, want_ids = log_q.topk(8, -1)
    ids, logps, log_rest = teacher_module.decode_rows(trainer.train_dataset[0]["teacher_chosen"])
    assert torch.equal(torch.tensor(ids).long(), want_ids)
    torch.testing.assert_close(torch.tensor(logps), want_logps, rtol=1e-5, atol=1e-5)
    rest = 1 - want_logps.exp().sum(-1)
    torch.testing.assert_close(torch.tensor(log_rest), rest.log(), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        ref_chosen, _ = guided_logps(reference, full)
    assert trainer.train_dataset[0]["ref_guided_chosen_logps"] == pytest.approx(ref_chosen[0].item(), rel=1e-5)

    # a precompute killed after shard 0 and 2, with shard 1 half-written
    before = {p.name: p.stat().st_mtime_ns for p in shards}
    columns = trainer.train_dataset[:]["teacher_chosen"]
    shards[1].unlink()
    (store / ".shard-00001.arrow.999.tmp").write_bytes(b"half")
    again = make_trainer(tiny_model_dir, tokenizer, pairs, tmp_path, **settings)
    after = {p.name: p.stat().st_mtime_ns for p in sorted(store.glob("shard-*.arrow"))}
    assert after.keys() == before.keys()
    assert after["shard-00000.arrow"] == before["shard-00000.arrow"]  # reused, not recomputed
    assert after["shard-00002.arrow"] == before["shard-00002.arrow"]
    assert after["shard-00001.arrow"] != before["shard-00001.arrow"]  # the missing one, recomputed
    assert again.train_dataset[:]["teacher_chosen"] == columns

    # another adapter (rank, random start) is the same reference: the whole store is reused
    torch.manual_seed(1)
    make_trainer(tiny_model_dir, tokenizer, pairs, tmp_path, **settings, lora_r=8)
    assert {p.name: p.stat().st_mtime_ns for p in sorted(store.glob("shard-*.arrow"))} == after

    # another K is another teacher: a new store, and the outdated one is removed
    make_trainer(tiny_model_dir, tokenizer, pairs, tmp_path, **{**settings, "distill_top_k": 4})
    (new_store,) = (tmp_path / "out" / teacher_module.TEACHER_DIR).glob("train-*")
    assert new_store != store and not store.exists()
    assert not (tmp_path / "cache" / teacher_module.CACHE_TEACHER_DIR).exists()  # the cache is off


def test_teacher_store_in_the_cache_is_reused_by_a_rerun_with_other_training_settings(
    tiny_model_dir, tokenizer, pairs, tmp_path, monkeypatch, caplog
):
    """With the cache on, the store is a cache entry: another learning rate, ALPHA or adapter runs no teacher
    pass (no guided forward of the reference), reads the same rows, and another K adds a store beside it."""
    import logging

    from preference_dpo import teacher as teacher_module
    from preference_dpo.trainer import PreferenceGuidedDPOTrainer

    guided_forwards = []
    original = PreferenceGuidedDPOTrainer._guided_logps
    monkeypatch.setattr(
        PreferenceGuidedDPOTrainer, "_guided_logps",
        lambda self, *a, **k: guided_forwards.append(1) or original(self, *a, **k),
    )  # fmt: skip
    settings = {"align_loss": "ref_distill", "distill_top_k": 8}
    first = make_trainer(tiny_model_dir, tokenizer, pairs, tmp_path, alpha=ALPHA, **settings)
    cache = tmp_path / "cache" / teacher_module.CACHE_TEACHER_DIR
    (store,) = cache.glob("train-*")
    assert not (tmp_path / "out" / teacher_module.TEACHER_DIR).exists()
    assert len(guided_forwards) == 3  # the teacher pass: 2 batches of the 8 train pairs, 1 of the 4 test pairs
    written = {p.name: p.stat().st_mtime_ns for p in store.glob("shard-*.arrow")}
    columns = first.train_dataset[:]["teacher_chosen"]

    guided_forwards.clear()
    caplog.set_level(logging.INFO, logger="preference_dpo.teacher")
    torch.manual_seed(1)
    again = make_trainer(
        tiny_model_dir, tokenizer, pairs, tmp_path, alpha=1.0, **settings, lora_r=8, learning_rate=3e-4
    )  # fmt: skip
    assert guided_forwards == []  # no teacher pass
    assert {p.name: p.stat().st_mtime_ns for p in store.glob("shard-*.arrow")} == written
    assert again.train_dataset[:]["teacher_chosen"] == columns
    assert "Reused the top-K teacher of the train pairs: no teacher pass" in caplog.text

    # another K is another entry; the cache keeps the first (another run may use it)
    make_trainer(tiny_model_dir, tokenizer, pairs, tmp_path, alpha=ALPHA, **{**settings, "distill_top_k": 4})
    assert len(list(cache.glob("train-*"))) == 2 and store.exists()
    assert len(guided_forwards) == 3


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--align_loss", "distill", "--distill_top_k", "16"], "--distill_top_k needs a fixed teacher"),
        (
            ["--align_loss", "ref_distill", "--distill_top_k", "-1"],
            r"DISTILL_TOP_K \(--distill_top_k\) must be >= 1, or 0 for the exact KL; got -1",
        ),
        (["--align_loss", "hinge", "--distill_top_k", "0"], "--distill_top_k needs a fixed teacher"),
        (["--align_loss", "hinge", "--distill_reduction", "sequence_sum"], "--distill_reduction applies to"),
        (
            ["--align_loss", "ref_distill", "--distill_reduction", "sum"],
            r"DISTILL_REDUCTION \(--distill_reduction\): invalid choice: 'sum'",
        ),
        (["--align_loss", "ref_distill", "--guided_forward", "full"], "ref_distill needs --guided_forward"),
        (["--align_loss", "ref_distill", "--use_peft", "false", "--distill_top_k", "0"], "without LoRA has no frozen"),
        (
            ["--align_loss", "onpolicy_distill", "--distill_on_policy_frac", "0"],
            r"DISTILL_ON_POLICY_FRAC \(--distill_on_policy_frac\) must be in \(0, 1\]; got 0",
        ),
        (["--align_loss", "onpolicy_distill", "--on_policy_temperature", "0"], "--on_policy_temperature must be > 0"),
        (
            ["--align_loss", "onpolicy_distill", "--on_policy_divergence", "jsd", "--on_policy_jsd_beta", "1"],
            r"--on_policy_jsd_beta must be in \(0, 1\)",
        ),
        (["--align_loss", "onpolicy_distill", "--use_peft", "false"], "onpolicy_distill without LoRA"),
        (["--align_loss", "onpolicy_distill", "--on_policy_max_new_tokens", "0"], "must be >= 1; got 0"),
    ],
)
def test_distill_options_are_validated(tiny_model_dir, tmp_path, monkeypatch, flags, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserInputError, match=message):
        parse_args(["--model_name_or_path", str(tiny_model_dir), *flags])


def test_valid_distill_options_parse(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, _, train = parse_args(
        ["--model_name_or_path", str(tiny_model_dir), "--align_loss", "ref_distill", "--distill_top_k", "64",
         "--distill_reduction", "sequence_sum"]
    )  # fmt: skip
    assert (train.align_loss, train.distill_top_k, train.distill_reduction) == ("ref_distill", 64, "sequence_sum")
    _, _, train = parse_args(["--model_name_or_path", str(tiny_model_dir), "--align_loss", "ref_distill",
                              "--use_peft", "false", "--distill_top_k", "16"])  # fmt: skip
    assert train.distill_top_k == 16  # without LoRA, a precomputed teacher needs no reference in memory


def test_top_k_larger_than_the_vocabulary_stops_before_weights_load(tiny_model_dir, tmp_path, monkeypatch):
    from preference_dpo import pipeline

    monkeypatch.chdir(tmp_path)
    args = parse_args(["--model_name_or_path", str(tiny_model_dir), "--align_loss", "ref_distill",
                       "--distill_top_k", "5000"])  # fmt: skip
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(UserInputError, match=r"--distill_top_k 5000 exceeds the model's vocabulary \(2048 tokens\)"):
        pipeline.run(*args)


# --- the reduction is one optimizer step's, whatever its split into micro-batches ---


@pytest.fixture(scope="module")
def four_pairs(tmp_path_factory):
    """The 2 pairs with the shortest responses, then the 2 with the longest (the embedded "verbose" flaw): split in
    two micro-batches, the mean of their token means is far from the 4 pairs' token mean."""
    rows = head_rows(EMBEDDED_TRAIN, 512)
    by_length = sorted(rows, key=lambda row: sum(len(row[side][-1]["content"]) for side in ("chosen", "rejected")))
    folder = tmp_path_factory.mktemp("four_pairs")
    return write_jsonl(folder / "train.jsonl", [*by_length[:2], *by_length[-2:]])


@pytest.fixture(scope="module")
def sharp_model(tiny_model_dir, tmp_path_factory):
    """The tiny model (and its tokenizer) with its weight matrices x10: at x1 its next-token distributions are
    nearly uniform, and the instruction moves them so little that the KL is ~3e-6."""
    import shutil

    from transformers import AutoModelForCausalLM

    folder = shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("sharp") / "model")
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(10)
    model.save_pretrained(folder)
    return folder


def one_sgd_step(model_dir, train, folder, reduction, batch, accum, capsys):
    """The adapter after one plain SGD step at learning rate 1 (its change is minus the gradient, unclipped) of
    ALPHA=1 ref_distill top-16 on the 4 pairs, and the logged aligned loss of that step."""
    import json

    from safetensors.torch import load_file

    from .test_reliability import run_main

    argv = [
        "--model_name_or_path", str(model_dir), "--train_dataset_path", str(train), "--test_dataset_path", "",
        "--output_dir", str(folder / "out"), "--log_dir", str(folder / "logs"), "--cache_dir", str(folder / "cache"),
        "--align_loss", "ref_distill", "--distill_top_k", "16", "--distill_reduction", reduction,
        "--aligned_loss_weight", "1", "--max_steps", "1", "--per_device_train_batch_size", str(batch),
        "--gradient_accumulation_steps", str(accum), "--optim", "sgd", "--learning_rate", "1",
        "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--max_grad_norm", "0", "--lora_dropout", "0",
        "--logging_steps", "1", "--train_sampling_strategy", "sequential", "--num_sample_prompts", "0",
    ]  # fmt: skip
    code, errors = run_main(argv, capsys)
    assert code == 0, errors
    history = json.loads((folder / "out" / "trainer_state.json").read_text())["log_history"]
    (logged,) = [entry for entry in history if "aligned_loss" in entry]
    return load_file(str(folder / "out" / "adapter_model.safetensors")), logged


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_sum"])
def test_gradient_accumulation_leaves_the_distill_loss_and_its_gradient_unchanged(
    sharp_model, four_pairs, tmp_path, capsys, reduction
):
    """Batch 4 x 1 micro-batch and batch 2 x 2 micro-batches: one optimizer step over the same 4 pairs. token_mean
    divides by the step's response tokens (as transformers divides by `num_items_in_batch`), not each micro-batch's;
    sequence_sum is a mean over responses, which equal micro-batches keep. Before the fix token_mean gave 0.0957
    (4 x 1) and 0.1074 (2 x 2) here."""
    whole, whole_log = one_sgd_step(sharp_model, four_pairs, tmp_path / "a", reduction, 4, 1, capsys)
    split, split_log = one_sgd_step(sharp_model, four_pairs, tmp_path / "b", reduction, 2, 2, capsys)
    assert split_log["aligned_loss"] == pytest.approx(whole_log["aligned_loss"], rel=1e-5)
    assert split_log["loss"] == pytest.approx(whole_log["loss"], rel=1e-5)
    assert whole.keys() == split.keys()
    moved = [name for name in whole if whole[name].abs().max() > 0 and "lora_B" in name]
    assert moved  # B starts at 0: its value after the step is minus its gradient
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("align_loss", ["hinge", "ref_distill"])
def test_the_instruction_gap_is_the_kl_from_the_instructed_reference_on_the_chosen_responses(
    tiny_model_dir, tokenizer, pairs, tmp_path, align_loss
):
    """docs/method.md, "Instruction gap": in evaluation, mean over the chosen responses' positions of
    KL(reference with the instruction || policy without it), computed here from both models' own logits, for a
    form that has no reference teacher (hinge) and one that has (ref_distill)."""
    trainer = make_trainer(tiny_model_dir, tokenizer, pairs, tmp_path, alpha=ALPHA, align_loss=align_loss)
    perturb_adapter(trainer)
    batch, full = first_batch(trainer)
    teacher_logits, teacher_mask, _ = reference_logits(tiny_model_dir, full)
    model = trainer.model.eval()
    with torch.no_grad():
        trainer.compute_loss(model, batch)
        student_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    chosen = batch["input_ids"].size(0) // 2
    mask = batch["completion_mask"][:, 1:].bool()
    log_q = torch.log_softmax(teacher_logits[:chosen][teacher_mask[:chosen]].double(), -1)
    log_s = torch.log_softmax(student_logits[:chosen][mask[:chosen]].double(), -1)
    expected = (log_q.exp() * (log_q - log_s)).sum(-1).mean().item()
    assert expected > 1e-3
    assert trainer._metrics["eval"]["instruction_gap"][-1] == pytest.approx(expected, rel=1e-4)
    assert "instruction_gap" not in trainer._metrics["train"]


def test_the_instruction_gap_on_the_models_own_answers_scores_each_answer_after_each_view(
    tiny_model_dir, tokenizer, pairs, tmp_path
):
    """`generated_instruction_gap`: the answers (any ids; here two made-up ones of other lengths, one ending in the
    end-of-sequence token) after the base prompt for the policy and after the instructed prompt for the frozen
    reference; the KL at the positions that predict them, averaged over all answer tokens."""
    from transformers import AutoModelForCausalLM

    from preference_dpo.data import load_preference_dataset
    from preference_dpo.report import encode_sample_prompts

    from .test_trl_contract import P

    trainer = make_trainer(tiny_model_dir, tokenizer, pairs, tmp_path, alpha=ALPHA, align_loss="hinge")
    perturb_adapter(trainer)
    raw = load_preference_dataset(pairs[1])
    settings = {"preference_text": P, "preference_position": "system", "num_soft_tokens": 0, "max_length": 256}
    prompts = encode_sample_prompts([raw[i]["prompt"] for i in range(2)], tokenizer, settings)
    answers = [[11, 12, 13, tokenizer.eos_token_id], [21, 22]]
    gap = trainer.generated_instruction_gap(prompts, answers)

    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    policy = trainer.model.eval()
    rows = []
    with torch.no_grad():
        for prompt, answer in zip(prompts, answers, strict=True):
            student = policy(input_ids=torch.tensor([prompt.base_ids + answer])).logits[0]
            teacher = reference(input_ids=torch.tensor([prompt.guided_ids + answer])).logits[0]
            student = student[len(prompt.base_ids) - 1 : len(prompt.base_ids) + len(answer) - 1]
            teacher = teacher[len(prompt.guided_ids) - 1 : len(prompt.guided_ids) + len(answer) - 1]
            log_q, log_s = torch.log_softmax(teacher.double(), -1), torch.log_softmax(student.double(), -1)
            rows.append((log_q.exp() * (log_q - log_s)).sum(-1))
    expected = torch.cat(rows).mean().item()
    assert expected > 1e-3 and len(torch.cat(rows)) == 6
    assert gap == pytest.approx(expected, rel=1e-4)
    assert trainer.generated_instruction_gap(prompts, [[], []]) is None


def test_the_on_policy_form_generates_without_the_instruction_and_scores_with_it(
    tiny_model_dir, tokenizer, pairs, tmp_path
):
    """ALIGN_LOSS=onpolicy_distill on an on-policy step: the policy samples answers to the chosen rows' prompts
    WITHOUT the instruction's tokens; the reference scores them after the prompts WITH them; the loss is the
    reverse KL at every answer token, summed per answer and averaged, as computed here from both models' own
    logits on the same ids."""
    from transformers import AutoModelForCausalLM

    from .test_trl_contract import P

    trainer = make_trainer(tiny_model_dir, tokenizer, pairs, tmp_path, alpha=ALPHA, align_loss="onpolicy_distill",
                           on_policy_max_new_tokens=5)  # fmt: skip
    perturb_adapter(trainer)
    batch, _ = first_batch(trainer)
    seen = {}
    generate, score = trainer.generate_answers, trainer.score_answers

    def spy_generate(prompts):
        seen["prompts"], seen["answers"] = prompts, generate(prompts)
        return seen["answers"]

    def spy_score(base_prompts, guided_prompts, answers):
        seen["guided"] = guided_prompts
        return score(base_prompts, guided_prompts, answers)

    trainer.generate_answers, trainer.score_answers = spy_generate, spy_score
    torch.manual_seed(0)
    model = trainer.model.train()
    trainer.compute_loss(model, batch)

    instruction = tokenizer(P, add_special_tokens=False)["input_ids"]

    def contains(ids, part):
        return any(ids[i : i + len(part)] == part for i in range(len(ids) - len(part) + 1))

    pairs_in_batch = batch["input_ids"].size(0) // 2
    assert len(seen["prompts"]) == pairs_in_batch == len(seen["answers"])
    assert not any(contains(p, instruction) for p in seen["prompts"])
    assert all(contains(g, instruction) for g in seen["guided"])
    assert all(1 <= len(a) <= 5 for a in seen["answers"])
    metrics = trainer._metrics["train"]
    assert metrics["onpolicy_frac"][-1] == 1.0
    assert metrics["onpolicy_generated_length"][-1] == pytest.approx(sum(map(len, seen["answers"])) / pairs_in_batch)

    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    sums = []
    with torch.no_grad():
        for prompt, guided, answer in zip(seen["prompts"], seen["guided"], seen["answers"], strict=True):
            student = model(input_ids=torch.tensor([prompt + answer])).logits[0, len(prompt) - 1 : -1]
            teacher = reference(input_ids=torch.tensor([guided + answer])).logits[0, len(guided) - 1 : -1]
            log_s, log_t = torch.log_softmax(student.double(), -1), torch.log_softmax(teacher.double(), -1)
            sums.append((log_s.exp() * (log_s - log_t)).sum())
    expected = torch.stack(sums).mean().item()
    assert expected > 1e-3
    assert metrics["onpolicy_distill_loss"][-1] == pytest.approx(expected, rel=1e-4)


def test_the_on_policy_form_off_its_steps_distils_on_the_pairs_responses(tiny_model_dir, tokenizer, pairs, tmp_path):
    """DISTILL_ON_POLICY_FRAC 0.5: step 0 takes the pairs' responses (no generation), the reverse KL against the
    reference's instructed view of them; step 1 generates."""
    trainer = make_trainer(tiny_model_dir, tokenizer, pairs, tmp_path, alpha=ALPHA, align_loss="onpolicy_distill",
                           distill_on_policy_frac=0.5, on_policy_max_new_tokens=3)  # fmt: skip
    perturb_adapter(trainer)
    batch, full = first_batch(trainer)
    calls = []
    generate = trainer.generate_answers
    trainer.generate_answers = lambda prompts: calls.append(len(prompts)) or generate(prompts)
    model, _ = training_loss(trainer, batch)
    assert calls == [] and trainer._metrics["train"]["onpolicy_frac"][-1] == 0.0
    teacher_logits, teacher_mask, _ = reference_logits(tiny_model_dir, full)
    with torch.no_grad():
        student_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask = batch["completion_mask"][:, 1:].bool()
    log_t = torch.log_softmax(teacher_logits[teacher_mask].double(), -1)
    log_s = torch.log_softmax(student_logits[mask].double(), -1)
    per_token = (log_s.exp() * (log_s - log_t)).sum(-1)
    expected = torch.stack([c.sum() for c in per_token.split(mask.sum(1).tolist())]).mean().item()
    assert trainer._metrics["train"]["onpolicy_distill_loss"][-1] == pytest.approx(expected, rel=1e-4)
    trainer.state.global_step = 1
    trainer.compute_loss(model, batch)
    assert calls == [batch["input_ids"].size(0) // 2] and trainer._metrics["train"]["onpolicy_frac"][-1] == 1.0
