"""`PreferenceGuidedDPOTrainer`: TRL's `DPOTrainer` plus the guided view and the aligned loss.

What it relies on in TRL 1.16 (pinned; `tests/test_trl_contract.py` fails loudly if any of it moves):
- `DPOTrainer._compute_loss(model, inputs, return_outputs)` returns the DPO loss of the base view and
  calls the policy first, as `model(..., labels=..., fused_lm_head=True)`, whose output carries
  per-token `log_probs` (zero off the completion). A forward hook picks that output up, so the base-view
  log-probs with gradient come from TRL's own forward: no second forward with gradient.
- `_prepare_dataset`, `_set_signature_columns_if_needed`, `compute_ref_log_probs` and the
  `self._metrics[mode]` lists that `log` averages.
- For the shared-prompt guided view: the fused forward passes `past_key_values` and `position_ids`
  through to the backbone, whose attention layers extend a given cache even though the fused head sets
  `use_cache=False` (`test_shared_prompt_guided_view_equals_full_guided_view` fails if not).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from trl import DPOTrainer
from trl.models.utils import disable_gradient_checkpointing

from .cache import cached_columns, log_reference_pass, reference_fingerprint
from .checkpoints import last_complete_checkpoint, mark_complete
from .errors import NonFiniteLossError
from .losses import (
    aligned_active,
    aligned_loss,
    chunked_distill_kl,
    pref_advantage_ratio,
    preference_stats,
    uses_reference_target,
)
from .views import split_views

logger = logging.getLogger(__name__)

GUIDED_COLUMNS = ("guided_prompt_ids",)
REFERENCE_GUIDED_COLUMNS = ("ref_guided_chosen_logps", "ref_guided_rejected_logps")


@contextlib.contextmanager
def capture_outputs(module: torch.nn.Module, fused_only: bool = True) -> Iterator[list[Any]]:
    """Collect, in call order, the outputs of `module`'s forwards (by default only those made with
    `fused_lm_head=True`, i.e. scored by TRL's fused LM head)."""
    captured: list[Any] = []

    def hook(_module, _args, kwargs, output):
        if kwargs.get("fused_lm_head") or not fused_only:
            captured.append(output)

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


def token_logps_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 256):
    """log p(target) for rows of hidden states through the LM head `weight`, `chunk` rows of logits at a time."""
    parts = [
        torch.log_softmax((hidden[i : i + chunk] @ weight.T).float(), dim=-1)
        .gather(-1, targets[i : i + chunk, None])
        .squeeze(-1)
        for i in range(0, hidden.size(0), chunk)
    ]
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def sequence_logps(per_token_logps: torch.Tensor, completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed response log-probs, exactly as TRL sums them (rows: chosen..., rejected...)."""
    seq_len = completion_mask.size(1) - 1
    return per_token_logps[:, -seq_len:].sum(dim=1).chunk(2, dim=0)


class PreferenceGuidedDPOTrainer(DPOTrainer):
    """DPO on the base view, plus `ALPHA * aligned_loss` against the guided view (docs/method.md).

    Datasets must come from `views.tokenize_preference_dataset` and batches from
    `views.PreferenceViewsCollator`. `prompt_embedding` ([k, hidden]) selects embedding mode.
    """

    def __init__(self, *args, prompt_embedding: torch.Tensor | None = None, **kwargs):
        self.prompt_embedding = prompt_embedding
        self.nonfinite_batches_skipped = 0
        super().__init__(*args, **kwargs)
        if uses_reference_target(self.args.align_loss):
            self.train_dataset = self._precompute_ref_guided_logps(self.train_dataset, "train")
            if self.eval_dataset is not None:
                self.eval_dataset = self._precompute_ref_guided_logps(self.eval_dataset, "eval")

    def _precompute_ref_logps(self, dataset, name, batch_size):
        log_reference_pass(dataset, self._precompute_model_hash, name, self.accelerator.is_main_process)
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def _precompute_ref_guided_logps(self, dataset, name: str):
        """The reference model's guided-view log-probs of every pair, once, as two new columns (`ref_hinge`);
        reused across runs from a file beside the data set, keyed like TRL's reference columns plus the soft
        prompt and the guided-forward layout."""
        from trl.trainer.utils import hash_module

        model_hash = self._precompute_model_hash or hash_module(self.ref_model or self.model)
        soft = (
            "" if self.prompt_embedding is None else hashlib.sha256(self.prompt_embedding.numpy().tobytes()).hexdigest()
        )
        fingerprint = reference_fingerprint(dataset, model_hash, "ref_guided", soft, self.args.guided_forward)
        what = f"the reference's guided-view log-probs of the {name} pairs"
        return cached_columns(
            dataset, fingerprint, lambda: self._ref_guided_columns(dataset, name), self.accelerator, what
        )

    def _ref_guided_columns(self, dataset, name: str) -> dict[str, list[float]]:
        from torch.utils.data import DataLoader
        from trl.trainer.utils import use_adapter

        loader = self.accelerator.prepare(
            DataLoader(dataset, batch_size=self.args.precompute_ref_batch_size or self.args.per_device_eval_batch_size,
                       collate_fn=self.data_collator, shuffle=False, num_workers=self.args.dataloader_num_workers)
        )  # fmt: skip
        model = self.ref_model or getattr(self, "_precompute_engine", None) or self.model
        adapter_off = contextlib.nullcontext()
        unwrapped, _ = self._unwrapped(self.model)
        if self.ref_model is None and hasattr(unwrapped, "peft_config"):
            adapter_off = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        chosen, rejected = [], []
        was_training = self.model.training
        self.model.eval()
        with adapter_off:
            for batch in loader:
                _, guided = split_views(batch)
                c, r = self.accelerator.gather_for_metrics(self._guided_logps(model, guided))
                chosen.append(c.float().cpu())
                rejected.append(r.float().cpu())
        self.model.train(was_training)
        logger.info("Computed the reference's guided-view log-probs for %d %s pairs", len(dataset), name)
        return {
            REFERENCE_GUIDED_COLUMNS[0]: torch.cat(chosen).tolist(),
            REFERENCE_GUIDED_COLUMNS[1]: torch.cat(rejected).tolist(),
        }

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        # Written after every other file of the checkpoint: without it, resume ignores the folder.
        if self.args.should_save:
            mark_complete(f"{self._get_output_dir(trial=trial)}/checkpoint-{self.state.global_step}")
        self.accelerator.wait_for_everyone()

    def _unwrapped(self, model) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(the model without DeepSpeed/DDP wrapping, its causal LM without the PEFT wrapper)."""
        unwrapped = self.accelerator.unwrap_model(model)
        return unwrapped, unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped

    # --- data: both views are tokenized before the model is loaded, so TRL's own pass is skipped ---

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        missing = {"prompt_ids", "chosen_ids", "rejected_ids", *GUIDED_COLUMNS} - set(dataset.column_names)
        if missing:
            raise ValueError(
                f"The {dataset_name} dataset lacks {sorted(missing)}: tokenize it with "
                "`preference_dpo.views.tokenize_preference_dataset` first."
            )
        return dataset

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        extra = (*GUIDED_COLUMNS, *REFERENCE_GUIDED_COLUMNS)
        self._signature_columns = [*self._signature_columns, *(c for c in extra if c not in self._signature_columns)]

    def compute_ref_log_probs(self, model, inputs):
        base, _ = split_views(inputs)
        return super().compute_ref_log_probs(model, base)

    # --- loss ---

    def _insert_soft_tokens(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Replace the placeholder embeddings at `mask` by the soft prompt, k rows per sequence, in order."""
        soft = self.prompt_embedding.to(device=embeds.device, dtype=embeds.dtype)
        return embeds.masked_scatter(mask.unsqueeze(-1), soft.repeat(embeds.size(0), 1))

    def _guided_logps(self, model, guided: dict[str, torch.Tensor], return_hidden: bool = False):
        """Summed response log-probs of the guided view, policy weights, no gradient.

        `return_hidden` (shared-prompt layout only) also returns the final hidden states at the response
        positions, ordered like the base view's (chosen rows, then rejected rows, tokens in order).
        """
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if "prompt_input_ids" in guided:
                return self._guided_logps_shared_prompt(model, guided, return_hidden)
            return self._guided_logps_full(model, guided)

    def _guided_logps_shared_prompt(self, model, guided: dict[str, torch.Tensor], return_hidden: bool = False):
        """Each guided prompt once; both responses on its KV cache, expanded to the pair.

        The prompt pass stops one token short, so that the response pass starts with the prompt's last
        token and the fused LM head scores every response token, the first one included.
        """
        from transformers import DynamicCache

        unwrapped, causal_lm = self._unwrapped(model)
        prompt_mask = guided["prompt_attention_mask"]
        prompt_embeds = unwrapped.get_input_embeddings()(guided["prompt_input_ids"])
        if "prompt_soft_token_mask" in guided:
            prompt_embeds = self._insert_soft_tokens(prompt_embeds, guided["prompt_soft_token_mask"])
        positions = (prompt_mask.cumsum(1) - 1).clamp(min=0)
        cache = DynamicCache(config=causal_lm.config)
        causal_lm.base_model(
            inputs_embeds=prompt_embeds[:, :-1], attention_mask=prompt_mask[:, :-1], position_ids=positions[:, :-1],
            past_key_values=cache, use_cache=True,
        )  # fmt: skip
        cache.batch_repeat_interleave(2)  # rows: pair 0 chosen, pair 0 rejected, pair 1 chosen, ...

        def interleave(t: torch.Tensor) -> torch.Tensor:
            chosen, rejected = t.chunk(2, dim=0)
            return torch.stack([chosen, rejected], dim=1).flatten(0, 1)

        completion, completion_mask = (
            interleave(guided["completion_ids"]),
            interleave(guided["completion_attention_mask"]),
        )
        inputs_embeds = torch.cat(
            [prompt_embeds[:, -1:].repeat_interleave(2, dim=0), unwrapped.get_input_embeddings()(completion)], dim=1
        )
        pair_mask = prompt_mask.repeat_interleave(2, dim=0)
        last = positions[:, -1:].repeat_interleave(2, dim=0)
        labels = torch.cat([torch.full_like(last, -100), completion.masked_fill(completion_mask == 0, -100)], dim=1)
        response_pass = {
            "inputs_embeds": inputs_embeds,
            "attention_mask": torch.cat([pair_mask, completion_mask], dim=1),
            "position_ids": last + torch.arange(inputs_embeds.size(1), device=last.device),
            "past_key_values": cache,
        }
        if not return_hidden:
            logps = model(**response_pass, labels=labels, fused_lm_head=True).log_probs.sum(dim=1)
            return logps[0::2], logps[1::2]
        hidden = causal_lm.base_model(**response_pass).last_hidden_state[:, :-1]
        targets = labels[:, 1:]
        scored = targets != -100
        token_logps = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
        weight = causal_lm.get_output_embeddings().weight
        token_logps[scored] = token_logps_from_hidden(hidden[scored], weight, targets[scored])
        logps = token_logps.sum(dim=1)
        in_base_order = torch.cat([hidden[0::2], hidden[1::2]])[torch.cat([scored[0::2], scored[1::2]])]
        return logps[0::2], logps[1::2], in_base_order

    def _guided_logps_full(self, model, guided: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole guided sequences, chosen and rejected each with its own copy of the prompt."""
        labels = guided["input_ids"].masked_fill(guided["completion_mask"] == 0, -100)
        kwargs: dict[str, Any] = {"attention_mask": guided["attention_mask"], "use_cache": False}
        if "soft_token_mask" in guided:
            embeds = self._unwrapped(model)[0].get_input_embeddings()(guided["input_ids"])
            kwargs["inputs_embeds"] = self._insert_soft_tokens(embeds, guided["soft_token_mask"])
        else:
            kwargs["input_ids"] = guided["input_ids"]
        outputs = model(**kwargs, labels=labels, fused_lm_head=True)
        return sequence_logps(outputs.log_probs, guided["completion_mask"])

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        base, guided = split_views(inputs)
        unwrapped, causal_lm = self._unwrapped(model)
        distill = self.args.align_loss == "distill"
        # distill also needs the base view's final hidden states (with gradient), from the same forward
        backbone = capture_outputs(causal_lm.base_model, fused_only=False) if distill else contextlib.nullcontext()
        with capture_outputs(unwrapped) as captured, backbone as backbone_outputs:
            result = super()._compute_loss(model, base, return_outputs)
        dpo_loss = result[0] if return_outputs else result
        metrics = self._metrics[mode]
        gather = self.accelerator.gather
        metrics["dpo_loss"].append(gather(dpo_loss.detach()).mean().item())

        loss = dpo_loss
        aligned = None
        weight = self.args.aligned_loss_weight
        reference_target = uses_reference_target(self.args.align_loss)
        # Training with ALPHA=0 is plain DPO, and `ref_hinge` reads its target from the precomputed
        # reference: both skip the guided forward. Evaluation always measures the guided view.
        policy_guided = mode == "eval" or (weight > 0 and not reference_target)
        if weight > 0 or mode == "eval":
            base_chosen, base_rejected = sequence_logps(captured[0].log_probs, base["completion_mask"])
            h_base = base_chosen - base_rejected
            metrics["accuracy_base"].append(gather((h_base.detach() > 0).float()).mean().item())
            metrics["margin_base"].append(gather(h_base.detach()).mean().item())
            if policy_guided:
                if distill:
                    guided_chosen, guided_rejected, teacher = self._guided_logps(model, guided, return_hidden=True)
                else:
                    guided_chosen, guided_rejected = self._guided_logps(model, guided)
                stats = preference_stats(base_chosen, base_rejected, guided_chosen, guided_rejected)
                h_pref = guided_chosen - guided_rejected
                metrics["accuracy_guided"].append(gather((h_pref > 0).float()).mean().item())
                metrics["margin_guided"].append(gather(h_pref).mean().item())
                metrics["pref_advantage_ratio"].append(pref_advantage_ratio(gather(stats.advantage)).item())
                metrics["pref_delta_w"].append(gather(stats.delta_w).mean().item())
                metrics["pref_delta_l"].append(gather(stats.delta_l).mean().item())
            if reference_target:
                target = guided["ref_chosen_logps"] - guided["ref_rejected_logps"]
            else:
                target = guided_chosen - guided_rejected
            if distill:
                response = base["completion_mask"][:, 1:].bool()
                student = backbone_outputs[0].last_hidden_state[:, :-1][response]
                aligned = chunked_distill_kl(student, teacher, causal_lm.get_output_embeddings().weight)
            else:
                aligned = aligned_loss(self.args.align_loss, target, h_base)
            if weight > 0:
                loss = dpo_loss + weight * aligned
            metrics["aligned_loss"].append(gather(aligned.detach()).mean().item())
            metrics[f"{self.args.align_loss}_loss"].append(metrics["aligned_loss"][-1])
            metrics["aligned_active_frac"].append(gather(aligned_active(target, h_base)).mean().item())
        if mode == "train":
            loss = self._check_finite(loss, dpo_loss, aligned)
        return (loss, result[1]) if return_outputs else loss

    def _check_finite(self, loss, dpo_loss, aligned):
        """Stop with an error on a NaN/Inf loss, or skip the batch with `--skip_nonfinite_batches`."""
        finite = self.accelerator.gather(torch.isfinite(loss.detach()).float().reshape(1)).min().item() == 1.0
        if finite:
            return loss
        step = self.state.global_step + 1
        if self.args.skip_nonfinite_batches:
            self.nonfinite_batches_skipped += 1
            self._metrics["train"]["nonfinite_batches_skipped"].append(self.nonfinite_batches_skipped)
            # A fresh leaf: backward through it leaves every gradient untouched.
            return loss.new_zeros((), requires_grad=True)
        parts = f"dpo_loss={dpo_loss.item():.4g}"
        if aligned is not None:
            parts += f", aligned_loss={aligned.item():.4g}, ALPHA={self.args.aligned_loss_weight:g}"
        last = last_complete_checkpoint(self.args.output_dir)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet"
        raise NonFiniteLossError(
            f"Step {step}: the training loss is {loss.item()} ({parts}); stopped, {kept}. Lower LEARNING_RATE or "
            "ALPHA, or set SKIP_NONFINITE_BATCHES=true to skip such batches."
        )
