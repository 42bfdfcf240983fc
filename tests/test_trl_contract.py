"""The TRL internals the trainer relies on, and the trainer's loss checked against independent forwards.

If TRL changes `_compute_loss`, the fused LM head or the metric lists, these fail first and loudly.
"""

import inspect
import math

import pytest
import torch
from transformers import Trainer
from trl import DPOTrainer

from preference_dpo.collator import PreferenceViewsCollator
from preference_dpo.config import ModelArguments, PreferenceDPOConfig
from preference_dpo.losses import dpo_sigmoid_loss
from preference_dpo.trainer import PreferenceGuidedDPOTrainer
from preference_dpo.views import tokenize_preference_dataset

P = "Please provide a helpful, honest, harmless and concise answer."


def test_trl_methods_we_override_exist_with_expected_signatures():
    expected = {
        "_compute_loss": ["self", "model", "inputs", "return_outputs"],
        "_prepare_dataset": ["self", "dataset", "processing_class", "args", "dataset_name"],
        "compute_ref_log_probs": ["self", "model", "inputs"],
        "_set_signature_columns_if_needed": ["self"],
        "_precompute_ref_logps": ["self", "dataset", "name", "batch_size"],
        "_get_num_items_in_batch": ["self", "batch_samples", "device"],
        "compute_loss": ["self", "model", "inputs", "return_outputs", "num_items_in_batch"],
    }
    for name, params in expected.items():
        assert list(inspect.signature(getattr(DPOTrainer, name)).parameters) == params, name
    # token_mean's divisor (`_token_mean_divisor`): the Trainer divides every micro-batch's loss by the number of
    # accumulation steps, because DPO's loss is not already scaled for them
    assert DPOTrainer.loss_is_scaled_for_ga is False
    assert "loss / self.current_gradient_accumulation_steps" in inspect.getsource(Trainer.training_step)
    source = inspect.getsource(DPOTrainer._compute_loss)
    # the policy forward comes first and goes through the fused LM head
    assert source.index("outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)") < source.index(
        "ref_outputs"
    )
    assert "per_token_logps.sum(dim=1)" in source


def test_trls_weight_hash_is_read_only_by_the_reference_precompute_we_override():
    """`trainer.trl_weight_hash_skipped` stubs `hash_module` in `DPOTrainer.__init__`: safe while the hash it
    makes is read by `_precompute_ref_logps` alone, which sets its own key first."""
    from trl.trainer import dpo_trainer

    assert "hash_module(" in inspect.getsource(DPOTrainer.__init__) and hasattr(dpo_trainer, "hash_module")
    readers = [
        name
        for name, member in inspect.getmembers(DPOTrainer, inspect.isfunction)
        if "self._precompute_model_hash" in inspect.getsource(member) and name != "__init__"
    ]
    assert readers == ["_precompute_ref_logps"]


def test_reference_cache_file_is_where_trl_keeps_it():
    """`cache.reference_fingerprint` reproduces TRL's key of its precomputed reference columns, so a cached
    data set carries them and the log can say whether the reference pass is reused."""
    source = inspect.getsource(DPOTrainer._precompute_ref_logps)
    assert "model_hash = self._precompute_model_hash" in source
    assert "fingerprint = [Hasher.hash((dataset._fingerprint, model_hash))]" in source
    assert "cache_file = dataset._get_cache_file_path(fingerprint)" in source
    assert "if os.path.exists(cache_file):" in source


def _settings_written_against(overrides: dict) -> dict:
    """The form settings these tests were written against, where a test leaves them out: `hinge`, exact
    `ref_distill` and `token_mean`, not the launcher's defaults (`forms.FORM_DEFAULTS`), which have tests of their own."""
    form = overrides.get("align_loss", "hinge")
    return {
        "align_loss": form,
        "distill_top_k": 0 if form == "ref_distill" else None,
        "distill_reduction": "token_mean",
        **overrides,
    }


def make_trainer(
    tiny_model_dir,
    tokenizer,
    small_data,
    tmp_path,
    *,
    alpha,
    soft=None,
    ref_model=None,
    lora_dropout=0.0,
    lora_r=16,
    **overrides,
):
    from transformers import AutoModelForCausalLM
    from trl import get_peft_config

    from preference_dpo.data import load_preference_dataset

    args = PreferenceDPOConfig(
        output_dir=str(tmp_path / "out"),
        log_dir=str(tmp_path / "logs"),
        aligned_loss_weight=alpha,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=3,
        logging_steps=1,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        seed=0,
        dataloader_num_workers=0,
        # the top-K teacher store lives in the cache when it is on
        **{"cache_dir": str(tmp_path / "cache"), **_settings_written_against(overrides)},
    )
    model_args = ModelArguments(model_name_or_path=str(tiny_model_dir), lora_dropout=lora_dropout, lora_r=lora_r)
    k = 0 if soft is None else soft.shape[0]
    datasets = [
        tokenize_preference_dataset(
            load_preference_dataset(path),
            tokenizer,
            name=name,
            preference_text=P,
            preference_position="system",
            num_soft_tokens=k,
            max_length=args.max_length,
            max_prompt_length=args.max_prompt_length,
        )
        for name, path in zip(("train", "test"), small_data, strict=True)
    ]
    return PreferenceGuidedDPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        ref_model=ref_model,
        args=args,
        data_collator=PreferenceViewsCollator(
            pad_token_id=tokenizer.pad_token_id, max_length=args.max_length, num_soft_tokens=k
        ),
        train_dataset=datasets[0],
        eval_dataset=datasets[1],
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        prompt_embedding=soft,
    )


def first_batch(trainer, n=4):
    """The trainer's batch of the first n pairs, and the same pairs' whole guided sequences (`full` layout)."""
    from preference_dpo.collator import PreferenceViewsCollator

    examples = [trainer.train_dataset[i] for i in range(n)]
    collator = trainer.data_collator
    full = PreferenceViewsCollator(
        pad_token_id=collator.pad_token_id, num_soft_tokens=collator.num_soft_tokens, guided_forward="full"
    )(examples)
    return trainer._prepare_inputs(collator(examples)), trainer._prepare_inputs(full)


def manual_logps(model, input_ids, attention_mask, completion_mask, inputs_embeds=None):
    """Summed response log-probs from a plain forward and log_softmax: independent of TRL's fused head."""
    kwargs = {"inputs_embeds": inputs_embeds} if inputs_embeds is not None else {"input_ids": input_ids}
    logits = model(**kwargs, attention_mask=attention_mask).logits[:, :-1].float()
    token_logps = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (token_logps * completion_mask[:, 1:]).sum(1).chunk(2)


def base_logps(model, batch):
    """(chosen, rejected) of the base view, by hand."""
    return manual_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])


def guided_logps(model, full):
    """(chosen, rejected) of the guided view, by hand, from whole guided sequences."""
    return manual_logps(model, full["guided_input_ids"], full["guided_attention_mask"], full["guided_completion_mask"])


def dpo(trainer, chosen, rejected, ref_chosen, ref_rejected):
    """TRL's default DPO loss by the paper's formula (`losses.dpo_sigmoid_loss`, hand-checked in test_losses)."""
    return dpo_sigmoid_loss(chosen, rejected, ref_chosen, ref_rejected, trainer.args.beta)


def training_loss(trainer, batch):
    """The policy (in train mode) and the trainer's loss on `batch`."""
    model = trainer.model
    model.train()
    return model, trainer.compute_loss(model, batch)


def expected_hinge(target_chosen, target_rejected, chosen, rejected):
    """mean(relu(target margin - base margin)), written out independently of preference_dpo.losses."""
    return torch.relu((target_chosen - target_rejected) - (chosen - rejected)).mean()


def assert_same_gradients(loss, expected, model, rtol, atol):
    params = [p for p in model.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad(loss, params), torch.autograd.grad(expected, params), strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def perturb_adapter(trainer, scale=0.05):
    """LoRA's B starts at zero (policy == reference); give it weights so policy and reference differ."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_loss_matches_independent_computation(tiny_model_dir, tokenizer, small_data, tmp_path, alpha):
    trainer = make_trainer(tiny_model_dir, tokenizer, small_data, tmp_path, alpha=alpha)
    perturb_adapter(trainer)
    batch, full = first_batch(trainer)
    model, loss = training_loss(trainer, batch)

    with torch.no_grad():
        chosen, rejected = base_logps(model, batch)
        g_chosen, g_rejected = guided_logps(model, full)
    dpo_loss = dpo(trainer, chosen, rejected, batch["ref_chosen_logps"], batch["ref_rejected_logps"])
    hinge = expected_hinge(g_chosen, g_rejected, chosen, rejected)
    assert trainer._metrics["train"]["dpo_loss"][-1] == pytest.approx(dpo_loss.item(), rel=1e-4)
    assert loss.item() == pytest.approx((dpo_loss + alpha * hinge).item(), rel=1e-4)
    # TRL's own logged log-probs are the ones the hook captured
    assert trainer._metrics["train"]["logps/chosen"][-1] == pytest.approx(chosen.mean().item(), rel=1e-4)
    if alpha == 0:
        assert "aligned_loss" not in trainer._metrics["train"]  # the guided view is skipped entirely
    else:
        assert trainer._metrics["train"]["aligned_loss"][-1] == pytest.approx(hinge.item(), rel=1e-4)
        ratio = math.exp(((g_chosen - g_rejected) - (chosen - rejected)).mean().item())
        assert trainer._metrics["train"]["pref_advantage_ratio"][-1] == pytest.approx(ratio, rel=1e-4)


def test_alpha_zero_equals_plain_trl_dpo(tiny_model_dir, tokenizer, small_data, tmp_path):
    """Same batch, same weights: our loss with ALPHA=0 is TRL's DPOTrainer loss, and our base-view
    tokenization is TRL's own."""
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from preference_dpo.data import load_preference_dataset

    ours = make_trainer(tiny_model_dir, tokenizer, small_data, tmp_path, alpha=0.0)
    perturb_adapter(ours)
    batch, _ = first_batch(ours)
    base_keys = {k: v for k, v in batch.items() if not k.startswith("guided_")}
    plain = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=DPOConfig(
            output_dir=str(tmp_path / "plain"),
            beta=ours.args.beta,
            precompute_ref_log_probs=True,
            report_to="none",
            bf16=False,
            max_steps=1,
            per_device_train_batch_size=4,
        ),
        train_dataset=load_preference_dataset(small_data[0]),
        processing_class=tokenizer,
        data_collator=DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id),
        peft_config=ours.model.peft_config["default"],
    )
    for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert plain.train_dataset[column] == ours.train_dataset[column], column
    plain.model.load_state_dict(ours.model.state_dict())
    ours.model.train()
    plain.model.train()
    assert ours.compute_loss(ours.model, batch).item() == pytest.approx(
        plain.compute_loss(plain.model, base_keys).item(), rel=1e-6
    )


def test_dpo_loss_is_ln2_before_training(tiny_model_dir, tokenizer, small_data, tmp_path):
    trainer = make_trainer(tiny_model_dir, tokenizer, small_data, tmp_path, alpha=0.1)
    trainer.model.train()
    trainer.compute_loss(trainer.model, first_batch(trainer)[0])
    assert trainer._metrics["train"]["dpo_loss"][-1] == pytest.approx(math.log(2), abs=1e-5)


def test_guided_view_has_no_gradient_and_base_view_does(tiny_model_dir, tokenizer, small_data, tmp_path):
    """The aligned term's gradient equals -alpha/B * sum over active pairs of grad(h_base): nothing from h_pref."""
    trainer = make_trainer(tiny_model_dir, tokenizer, small_data, tmp_path, alpha=1.0)
    perturb_adapter(trainer)
    batch, full = first_batch(trainer)
    model, total = training_loss(trainer, batch)
    chosen, rejected = base_logps(model, batch)
    with torch.no_grad():
        g_chosen, g_rejected = guided_logps(model, full)
    dpo_loss = dpo(trainer, chosen, rejected, batch["ref_chosen_logps"], batch["ref_rejected_logps"])
    expected = dpo_loss + expected_hinge(g_chosen, g_rejected, chosen, rejected)
    assert_same_gradients(total, expected, model, rtol=1e-4, atol=1e-6)


def test_embedding_mode_inserts_soft_tokens_after_the_prompt(tiny_model_dir, tokenizer, small_data, tmp_path):
    soft = torch.randn(3, 64, generator=torch.Generator().manual_seed(1)) * 0.1
    trainer = make_trainer(tiny_model_dir, tokenizer, small_data, tmp_path, alpha=0.5, soft=soft)
    perturb_adapter(trainer)
    batch, full = first_batch(trainer)
    model = trainer.model
    model.eval()
    with torch.no_grad():
        got = trainer._guided_logps(
            model,
            {
                "input_ids": full["guided_input_ids"],
                "attention_mask": full["guided_attention_mask"],
                "completion_mask": full["guided_completion_mask"],
                "soft_token_mask": full["guided_soft_token_mask"],
            },
        )
        got_chosen, got_rejected = got.chosen, got.rejected
        # Build the guided embeddings by hand, row by row: prompt, soft tokens, response.
        embed = model.get_input_embeddings()
        rows = []
        for row in range(full["guided_input_ids"].size(0)):
            ids = full["guided_input_ids"][row]
            p_len = int(full["guided_soft_token_mask"][row].nonzero()[0])
            rows.append(torch.cat([embed(ids[:p_len]), soft, embed(ids[p_len + 3 :])]))
        want_chosen, want_rejected = manual_logps(
            model,
            full["guided_input_ids"],
            full["guided_attention_mask"],
            full["guided_completion_mask"],
            inputs_embeds=torch.stack(rows),
        )
    torch.testing.assert_close(got_chosen, want_chosen, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_rejected, want_rejected, rtol=1e-4, atol=1e-4)
    # and the soft tokens change the log-probs (they are really inserted)
    plain_chosen, _ = guided_logps(model, full)
    assert not torch.allclose(plain_chosen, got_chosen)


def test_only_lora_weights_change_in_training(tiny_model_dir, tokenizer, small_data, tmp_path):
    trainer = make_trainer(tiny_model_dir, tokenizer, small_data, tmp_path, alpha=0.1, learning_rate=1e-2)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    lora = {n for n in before if "lora_" in n}
    assert changed and changed <= lora
    assert {n for n in lora if "lora_B" in n} <= changed  # every adapter matrix B moved off zero


def test_separate_reference_model_without_precompute(tiny_model_dir, tokenizer, small_data, tmp_path):
    """REFERENCE_MODEL_PATH: a different frozen model scores the reference, on the fly when precompute is off."""
    from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

    torch.manual_seed(7)
    reference = Qwen2ForCausalLM(AutoModelForCausalLM.from_pretrained(tiny_model_dir).config)  # other weights
    reference.eval()
    trainer = make_trainer(
        tiny_model_dir,
        tokenizer,
        small_data,
        tmp_path,
        alpha=0.5,
        ref_model=reference,
        precompute_ref_log_probs=False,
    )
    batch, full = first_batch(trainer)
    assert "ref_chosen_logps" not in batch
    model, loss = training_loss(trainer, batch)
    with torch.no_grad():
        chosen, rejected = base_logps(model, batch)
        ref_chosen, ref_rejected = base_logps(reference, batch)
        g_chosen, g_rejected = guided_logps(model, full)
    dpo_loss = dpo(trainer, chosen, rejected, ref_chosen, ref_rejected)
    hinge = expected_hinge(g_chosen, g_rejected, chosen, rejected)
    assert abs(dpo_loss.item() - math.log(2)) > 1e-3  # the reference really differs from the policy
    assert loss.item() == pytest.approx((dpo_loss + 0.5 * hinge).item(), rel=1e-4)


@pytest.mark.parametrize("k", [0, 3], ids=["text", "embedding"])
def test_shared_prompt_guided_view_equals_full_guided_view(tiny_model_dir, tokenizer, small_data, tmp_path, k):
    """The optimised guided forward (prompt once, responses on its cache) gives the plain forward's log-probs."""
    from preference_dpo.collator import PreferenceViewsCollator, split_views

    soft = torch.randn(3, 64, generator=torch.Generator().manual_seed(2)) * 0.1 if k else None
    trainer = make_trainer(tiny_model_dir, tokenizer, small_data, tmp_path, alpha=0.5, soft=soft)
    perturb_adapter(trainer)
    examples = [trainer.train_dataset[i] for i in range(8)]
    assert len({len(ex["guided_prompt_ids"]) for ex in examples}) > 1  # prompts of several lengths: padding matters
    views = {
        mode: split_views(PreferenceViewsCollator(pad_token_id=tokenizer.pad_token_id, num_soft_tokens=k,
                                                  guided_forward=mode)(examples))[1]
        for mode in ("full", "shared_prompt")
    }  # fmt: skip
    trainer.model.eval()
    full = trainer._guided_logps(trainer.model, views["full"], with_hidden=True)
    shared = trainer._guided_logps(trainer.model, views["shared_prompt"], with_hidden=True)
    for a, b in ((full.chosen, shared.chosen), (full.rejected, shared.rejected)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-4)  # fp32 sums over ~60 tokens
    # the hidden states at the response positions: the same rows, in the same (base-view) order
    torch.testing.assert_close(full.hidden, shared.hidden, rtol=1e-4, atol=1e-4)
    without = trainer._guided_logps(trainer.model, views["full"])
    assert without.hidden is None
    torch.testing.assert_close(without.chosen, full.chosen, rtol=1e-5, atol=2e-4)  # fused head vs ours


def test_ref_hinge_targets_the_reference_guided_margin_without_a_guided_forward(
    tiny_model_dir, tokenizer, small_data, tmp_path
):
    from transformers import AutoModelForCausalLM

    from preference_dpo.trainer import capture_outputs

    trainer = make_trainer(tiny_model_dir, tokenizer, small_data, tmp_path, alpha=0.5, align_loss="ref_hinge")
    perturb_adapter(trainer)
    batch, full = first_batch(trainer)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # the policy with its adapter off
    with torch.no_grad():
        ref_chosen, ref_rejected = guided_logps(reference, full)
    torch.testing.assert_close(batch["guided_ref_chosen_logps"], ref_chosen, rtol=1e-5, atol=2e-4)
    torch.testing.assert_close(batch["guided_ref_rejected_logps"], ref_rejected, rtol=1e-5, atol=2e-4)
    assert "ref_guided_chosen_logps" in trainer.eval_dataset.column_names

    model = trainer.model
    model.train()
    with capture_outputs(model) as forwards:
        loss = trainer.compute_loss(model, batch)
    assert len(forwards) == 1  # the base view only: no guided forward in a training step
    with torch.no_grad():
        chosen, rejected = base_logps(model, batch)
    dpo_loss = dpo(trainer, chosen, rejected, batch["ref_chosen_logps"], batch["ref_rejected_logps"])
    hinge = expected_hinge(ref_chosen, ref_rejected, chosen, rejected)
    assert loss.item() == pytest.approx((dpo_loss + 0.5 * hinge).item(), rel=1e-4)
    assert "pref_advantage_ratio" not in trainer._metrics["train"]
    assert trainer._metrics["train"]["aligned_loss"][-1] == pytest.approx(hinge.item(), rel=1e-4)


def test_distill_matches_an_independent_token_level_kl(tiny_model_dir, tokenizer, small_data, tmp_path):
    """loss = dpo + alpha * mean over response tokens of KL(pi(.|p,x,y<t) || pi(.|x,y<t)), teacher detached:
    value and gradient against full logits from plain forwards."""
    from preference_dpo.losses import distill_kl

    trainer = make_trainer(tiny_model_dir, tokenizer, small_data, tmp_path, alpha=0.5, align_loss="distill")
    perturb_adapter(trainer)
    batch, full = first_batch(trainer)
    model, loss = training_loss(trainer, batch)

    student_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    with torch.no_grad():
        teacher_logits = model(input_ids=full["guided_input_ids"], attention_mask=full["guided_attention_mask"]).logits[
            :, :-1
        ]
    kl = distill_kl(
        student_logits[batch["completion_mask"][:, 1:].bool()],
        teacher_logits[full["guided_completion_mask"][:, 1:].bool()],
    )
    chosen, rejected = base_logps(model, batch)
    expected = dpo(trainer, chosen, rejected, batch["ref_chosen_logps"], batch["ref_rejected_logps"]) + 0.5 * kl
    assert kl.item() > 1e-4  # the instruction changes the distribution: a real signal
    assert trainer._metrics["train"]["aligned_loss"][-1] == pytest.approx(kl.item(), rel=1e-4)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert_same_gradients(loss, expected, model, rtol=1e-3, atol=1e-6)
