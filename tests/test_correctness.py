"""Correctness where users run it: LoRA dropout, gradient checkpointing, LM heads of other model families."""

import pytest
import torch

from preference_dpo.collator import split_views
from tests.test_trl_contract import first_batch, make_trainer, perturb_adapter

# --- LORA_DROPOUT: on the policy's gradient forward, never on a forward without gradient ---


def lora_dropouts(model) -> list[torch.nn.Dropout]:
    return [m for name, m in model.named_modules() if name.endswith("lora_dropout.default")]


def test_lora_dropout_acts_on_the_gradient_forward_only(tiny_model_dir, tokenizer, small_data, tmp_path):
    """TRL's `disable_dropout` zeroes every dropout, LoRA's too; LORA_DROPOUT=0.3 must act where gradients flow
    (the base view), and the guided target, computed without gradient, must not be noisy."""
    trainer = make_trainer(tiny_model_dir, tokenizer, small_data, tmp_path, alpha=0.5, lora_dropout=0.3)
    perturb_adapter(trainer)
    dropouts = lora_dropouts(trainer.model)
    assert dropouts and all(isinstance(d, torch.nn.Dropout) for d in dropouts)
    calls = []  # (gradient enabled, dropout rate in effect) for every LoRA dropout call

    def record(module, _args):
        calls.append((torch.is_grad_enabled(), module.p if module.training else 0.0))

    handles = [d.register_forward_pre_hook(record) for d in dropouts]
    batch, _ = first_batch(trainer)
    model = trainer.model
    model.train()
    torch.manual_seed(0)
    trainer.compute_loss(model, batch)
    for handle in handles:
        handle.remove()
    assert {rate for grad, rate in calls if grad} == {0.3}
    assert {rate for grad, rate in calls if not grad} == {0.0}  # the guided pass
    # the dropout really acts: the same batch scored twice with gradient gives two different losses...
    torch.manual_seed(1)
    first = trainer.compute_loss(model, batch).item()
    torch.manual_seed(2)
    assert trainer.compute_loss(model, batch).item() != first
    # ...while two guided passes on the same batch, in training mode, give identical log-probs
    _, guided = split_views(batch)
    torch.manual_seed(3)
    once = trainer._guided_logps(model, guided)
    torch.manual_seed(4)
    again = trainer._guided_logps(model, guided)
    assert model.training
    assert torch.equal(once.chosen, again.chosen) and torch.equal(once.rejected, again.rejected)


# --- gradient checkpointing: no hook left behind per step ---


@pytest.mark.parametrize("precompute", [True, False], ids=["precomputed_reference", "reference_each_step"])
def test_gradient_checkpointing_leaves_no_hook_per_step(tiny_model_dir, tokenizer, small_data, tmp_path, precompute):
    """Each guided pass (and TRL's own reference pass) ran with gradient checkpointing turned off and on again,
    and every turn-on added one more forward hook to the input embeddings, which never went away."""
    from transformers import TrainerCallback

    class CountHooks(TrainerCallback):
        def __init__(self, embeddings):
            self.embeddings, self.counts = embeddings, []

        def on_step_end(self, args, state, control, **kwargs):
            self.counts.append(len(self.embeddings._forward_hooks))

    trainer = make_trainer(
        tiny_model_dir,
        tokenizer,
        small_data,
        tmp_path,
        alpha=0.5,
        gradient_checkpointing=True,
        precompute_ref_log_probs=precompute,
    )  # 3 steps
    counter = CountHooks(trainer.model.get_input_embeddings())
    trainer.add_callback(counter)
    trainer.train()
    assert len(counter.counts) == 3 and counter.counts[0] >= 1
    assert counter.counts == [counter.counts[0]] * 3


# --- the LM head as the model applies it: bias, logit scale, final-logit soft-capping ---

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, bos_token_id=0, eos_token_id=1, pad_token_id=2)  # fmt: skip


def tiny_family_model(family: str):
    """A random tiny model of a family whose LM head does more than `hidden @ W.T`, in eval mode."""
    from transformers import (
        CohereConfig,
        CohereForCausalLM,
        Gemma2Config,
        Gemma2ForCausalLM,
        GraniteConfig,
        GraniteForCausalLM,
        PhiConfig,
        PhiForCausalLM,
    )

    torch.manual_seed(0)
    if family == "gemma2_softcap":  # a small cap and large weights, so that capping changes the logits a lot
        model = Gemma2ForCausalLM(Gemma2Config(**TINY, head_dim=8, final_logit_softcapping=0.5, initializer_range=0.5))
    elif family == "cohere_logit_scale":
        model = CohereForCausalLM(CohereConfig(**TINY, logit_scale=0.25))
    elif family == "granite_logits_scaling":
        model = GraniteForCausalLM(GraniteConfig(**TINY, logits_scaling=4.0))
    else:  # phi: the LM head has a bias (initialised to zero: give it values)
        model = PhiForCausalLM(PhiConfig(**TINY))
        with torch.no_grad():
            model.lm_head.bias.normal_(0, 1.0)
    return model.eval()


def test_trl_fused_head_reads_the_config_fields_lm_head_of_mirrors():
    """`lm_head_of` copies how TRL's fused head (which scores the base view) reads the logit post-processing
    from the config; if TRL learns a new field, this fails and `lm_head_of` must learn it too."""
    import inspect
    import re

    from trl.trainer.utils import add_fused_lm_head

    source = inspect.getsource(add_fused_lm_head)
    moe = {"output_router_logits", "router_aux_loss_coef"}  # the MoE auxiliary loss, not the head
    fields = set(re.findall(r'getattr\(text_config, "(\w+)"', source)) - moe
    head_fields = {
        "final_logit_softcapping",
        "logit_scale",
        "output_multiplier",
        "lm_head_multiplier",
        "logits_scaling",
    }
    assert fields == head_fields
    assert "weight, bias = lm_head.weight, lm_head.bias" in source


@pytest.mark.parametrize("family", ["gemma2_softcap", "cohere_logit_scale", "granite_logits_scaling", "phi_bias"])
def test_hidden_state_scoring_matches_the_models_own_logits(family):
    """What the distill path and the shared-prompt hidden states compute from hidden states (log-probs, KL)
    equals what the model's own logits give, and differs from the bare `hidden @ W.T`."""
    from preference_dpo.losses import chunked_rows, distill_kl, token_kl
    from preference_dpo.trainer import check_lm_head, lm_head_of, token_logps_from_hidden

    model = tiny_family_model(family)
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        own = model(input_ids=ids).logits.flatten(0, 1)
        hidden = model.base_model(input_ids=ids).last_hidden_state.flatten(0, 1)
    head = lm_head_of(model)
    torch.testing.assert_close(head.logits(hidden), own, rtol=1e-5, atol=1e-5)
    bare = torch.log_softmax(hidden @ model.get_output_embeddings().weight.T, -1)
    assert (bare - torch.log_softmax(own, -1)).abs().max() > 1e-2  # the family's head really differs
    targets = ids.flatten()
    want = torch.log_softmax(own, -1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(token_logps_from_hidden(hidden, head, targets, chunk=5), want, rtol=1e-5, atol=1e-5)
    student, teacher = hidden[:12], hidden[12:]
    torch.testing.assert_close(
        chunked_rows(lambda s, t: token_kl(head.logits(s), head.logits(t)), student, teacher, chunk=5).mean(),
        distill_kl(own[:12], own[12:]),
        rtol=1e-5,
        atol=1e-6,
    )
    check_lm_head(model, head)  # consistent: no error


def test_a_model_whose_logits_the_head_does_not_reproduce_is_refused():
    """A family with a logit transform neither TRL's fused head nor this trainer knows: a clear error, not a
    silently wrong distill loss."""
    from preference_dpo.errors import UserInputError
    from preference_dpo.losses import LMHead
    from preference_dpo.trainer import check_lm_head, lm_head_of

    model = tiny_family_model("gemma2_softcap")
    head = lm_head_of(model)
    unaware = LMHead(head.weight, head.bias)  # as if the soft-cap were an unknown feature
    with pytest.raises(UserInputError, match="logits are not its LM head applied to its last hidden states"):
        check_lm_head(model, unaware)
    with pytest.raises(UserInputError, match=r"\(ALIGN_LOSS=ref_distill here"):  # the form that asked, named
        check_lm_head(model, unaware, "ref_distill")


@pytest.fixture(scope="module")
def tiny_gemma2_dir(tiny_model_dir, tmp_path_factory):
    """A random tiny Gemma-2 (final-logit soft-capping) with the tiny model's tokenizer."""
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, final_logit_softcapping=2.0, initializer_range=0.2,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_gemma2")
    Gemma2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_distill_on_a_soft_capping_model_uses_the_capped_logits(tiny_gemma2_dir, tokenizer, small_data, tmp_path):
    """ALIGN_LOSS=distill on Gemma-2: the KL and the guided log-probs are those of the model's own (capped)
    logits, as independent plain forwards give them."""
    from preference_dpo.losses import distill_kl
    from tests.test_trl_contract import base_logps, guided_logps

    trainer = make_trainer(tiny_gemma2_dir, tokenizer, small_data, tmp_path, alpha=0.5, align_loss="distill")
    perturb_adapter(trainer)
    batch, full = first_batch(trainer)
    model = trainer.model
    model.train()
    trainer.compute_loss(model, batch)
    model.eval()
    with torch.no_grad():
        student = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        teacher = model(input_ids=full["guided_input_ids"], attention_mask=full["guided_attention_mask"]).logits
        kl = distill_kl(
            student[batch["completion_mask"][:, 1:].bool()],
            teacher[:, :-1][full["guided_completion_mask"][:, 1:].bool()],
        )
        chosen, rejected = base_logps(model, batch)
        g_chosen, g_rejected = guided_logps(model, full)
    metrics = trainer._metrics["train"]
    assert metrics["aligned_loss"][-1] == pytest.approx(kl.item(), rel=1e-4)
    assert metrics["pref_delta_w"][-1] == pytest.approx((g_chosen - chosen).mean().item(), rel=1e-3, abs=1e-4)
    assert metrics["pref_delta_l"][-1] == pytest.approx((g_rejected - rejected).mean().item(), rel=1e-3, abs=1e-4)
