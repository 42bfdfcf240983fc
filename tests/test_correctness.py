"""Correctness where users run it: LoRA dropout, gradient checkpointing, LM heads of other model families."""

import pytest
import torch

from preference_dpo.views import split_views
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
    for a, b in zip(once, again, strict=True):
        assert torch.equal(a, b)


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
