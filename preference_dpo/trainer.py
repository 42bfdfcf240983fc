"""`PreferenceGuidedDPOTrainer`: TRL's `DPOTrainer` plus the guided view and the aligned loss.

What it relies on in TRL 1.16 (pinned; `tests/test_trl_contract.py` fails loudly if any of it moves):
- `DPOTrainer._compute_loss(model, inputs, return_outputs)` returns the DPO loss of the base view and
  calls the policy first, as `model(..., labels=..., fused_lm_head=True)`, whose output carries
  per-token `log_probs` (zero off the completion). A forward hook picks that output up, so the base-view
  log-probs with gradient come from TRL's own forward: no second forward with gradient.
- `_prepare_dataset`, `_set_signature_columns_if_needed`, `compute_ref_log_probs` and the
  `self._metrics[mode]` lists that `log` averages.
- transformers' `_get_num_items_in_batch` (the count passed to `compute_loss`, which TRL's drops) and the
  Trainer's division of each micro-batch's loss by the accumulation steps (`DPOTrainer.loss_is_scaled_for_ga`
  is False): `token_mean`'s divisor is built on both.
- `DPOConfig.disable_dropout` zeroes every dropout, LoRA's included (undone for the trained adapter), and the
  fused head reads the LM-head bias, logit scale and final soft-cap from the config as `lm_head_of` does
  (`tests/test_correctness.py` checks both).
- For the shared-prompt guided view: the fused forward passes `past_key_values` and `position_ids`
  through to the backbone, whose attention layers extend a given cache even though the fused head sets
  `use_cache=False` (`test_shared_prompt_guided_view_equals_full_guided_view` fails if not).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
from trl import DPOTrainer

from .cache import base_weights_hash, cached_columns, log_reference_pass, make_key, reference_fingerprint
from .collator import split_views
from .errors import UserInputError
from .faults import FaultTolerantTrainer
from .forms import form_for
from .forms.base import FormInputs, GuidedLogps, GuidedViews, ScoredAnswers
from .head_pass import install as install_head_pass
from .losses import (
    LMHead,
    aligned_active,
    chunked_divergence,
    pref_advantage_ratio,
    preference_stats,
    topk_teacher,
)
from .report import details
from .soft_prompt import insert_soft_tokens
from .teacher import TEACHER_COLUMNS

logger = logging.getLogger(__name__)

GUIDED_COLUMNS = ("guided_prompt_ids",)
REFERENCE_GUIDED_COLUMNS = ("ref_guided_chosen_logps", "ref_guided_rejected_logps")
CONTEXT_ANSWER_COLUMN = "context_answer_ids"  # ALIGN_LOSS=context_distill: the reference's instructed answer


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


@contextlib.contextmanager
def evaluation_mode(model: torch.nn.Module) -> Iterator[None]:
    """`model` in eval mode for a forward without gradient: no dropout (LoRA's included), so a target or a
    teacher is not noisy; and no gradient checkpointing, which acts in training mode only, so it need not be
    switched off and on again (switching it on adds a hook to the input embeddings every time)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def random_state_kept() -> Iterator[None]:
    """The global random generators (Python, NumPy, torch CPU and CUDA) as they were before the block.

    Every iteration over a `DataLoader` without a generator draws its base seed from torch's global generator. The
    passes before training (the reference's log-probs, its guided view, the top-K teacher) run only when the cache
    lacks their values, so without this a run that reused the cache would start training from another random
    state than the run that filled it: other LoRA dropout masks, and a killed run's resume would not match an
    uninterrupted one.
    """
    import random

    import numpy as np

    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def input_grad_hooks_kept(causal_lm: torch.nn.Module) -> Iterator[None]:
    """Remove the input-embedding hooks that a gradient-checkpointing off/on inside the block duplicated.

    TRL runs its on-the-fly reference forward (`--precompute_ref_log_probs false`) and its reference
    precompute between `gradient_checkpointing_disable()` and `_enable()`. On a PEFT-wrapped model transformers'
    turn-off removes no `enable_input_require_grads` hook and its turn-on registers new ones, so each batch
    would leave one more hook behind. Acts only if the hooks from before are still registered.
    """
    before = getattr(causal_lm, "_require_grads_hooks", None)
    try:
        yield
    finally:
        after = getattr(causal_lm, "_require_grads_hooks", None)
        if after is not before and before and all(_registered(handle) for handle in before):
            for handle in after or ():
                handle.remove()
            causal_lm._require_grads_hooks = before


def _registered(handle) -> bool:
    hooks = handle.hooks_dict_ref()
    return hooks is not None and handle.id in hooks


def lm_head_of(causal_lm) -> LMHead:
    """`causal_lm`'s LM head with the logit scale and final soft-cap its config declares, read from the same
    fields, in the same order, as TRL's fused LM head (`trl.trainer.utils.add_fused_lm_head`) reads them to
    score the base view; so what is scored from hidden states here matches the base view."""
    config = causal_lm.config.get_text_config()
    scale = getattr(config, "logit_scale", None)  # Cohere; None on models that do not scale (MPT)
    if scale is None:
        scale = getattr(config, "output_multiplier", None)
    if scale is None:
        scale = getattr(config, "lm_head_multiplier", None)  # Falcon-H1
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        # Granite and MiniCPM3 divide the logits by it, HyperCLOVA X multiplies them by it
        scale = config.logits_scaling if config.model_type == "hyperclovax" else 1 / config.logits_scaling
    head = causal_lm.get_output_embeddings()
    return LMHead(
        weight=head.weight,
        bias=head.bias,
        logit_scale=1.0 if scale is None else float(scale),
        final_logit_softcapping=getattr(config, "final_logit_softcapping", None),
    )


def check_lm_head(causal_lm, head: LMHead, align_loss: str = "distill") -> None:
    """`UserInputError` unless the model's own logits are `head.logits` of its last hidden states (a few tokens,
    eval mode, no gradient): a model that post-processes its logits in another way would get silently wrong
    log-probs wherever they are scored from hidden states."""
    vocab_size = causal_lm.config.get_text_config().vocab_size
    ids = (torch.arange(8, device=head.weight.device) % vocab_size)[None]
    with torch.no_grad(), evaluation_mode(causal_lm):
        own = causal_lm(input_ids=ids).logits.float()
        ours = head.logits(causal_lm.base_model(input_ids=ids).last_hidden_state)
    gap = (own - ours).abs().max().item()
    # bf16 rounding stays far below 1% of the largest logit; a missing cap or scale goes far above
    if gap > 1e-2 * max(1.0, own.abs().max().item()):
        raise UserInputError(
            f"Model {causal_lm.config.name_or_path!r} ({causal_lm.config.model_type}): its logits are not its LM head "
            f"applied to its last hidden states (largest difference {gap:.3g}). Scoring from hidden states "
            f"(ALIGN_LOSS={align_loss} here, and TRL's fused LM head for every log-prob of the DPO loss) supports "
            "an LM-head bias, logit scaling and final-logit soft-capping; this model post-processes its logits "
            "otherwise and is not supported."
        )


def token_logps_from_hidden(hidden: torch.Tensor, lm_head: LMHead, targets: torch.Tensor, chunk: int = 256):
    """log p(target) for rows of hidden states through `lm_head`, `chunk` rows of logits at a time."""
    parts = [
        torch.log_softmax(lm_head.logits(hidden[i : i + chunk]), dim=-1)
        .gather(-1, targets[i : i + chunk, None])
        .squeeze(-1)
        for i in range(0, hidden.size(0), chunk)
    ]
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def zero3() -> bool:
    """DeepSpeed ZeRO-3: parameters are sharded, gathered only inside their modules' forwards."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def prompts_of(ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask, rows: int) -> list[list[int]]:
    """The prompt ids of the first `rows` rows: the attended positions outside the completion, in order."""
    prompt = attention_mask.bool() & ~torch.as_tensor(completion_mask, device=ids.device).bool()
    return [ids[i][prompt[i]].tolist() for i in range(rows)]


def sequence_logps(per_token_logps: torch.Tensor, completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed response log-probs, exactly as TRL sums them (rows: chosen..., rejected...)."""
    seq_len = completion_mask.size(1) - 1
    return per_token_logps[:, -seq_len:].sum(dim=1).chunk(2, dim=0)


@contextlib.contextmanager
def trl_weight_hash_skipped() -> Iterator[None]:
    """TRL's `DPOTrainer.__init__` without its `hash_module(model)`: every rank would read every weight (a 1.5B
    model in bf16: ~6 GB through SHA-256, ~10 s per rank) for a key that `_precompute_ref_logps` replaces by
    `_reference_key` (the base weights' digest, read once on one process) before anything uses it."""
    from trl.trainer import dpo_trainer

    original = dpo_trainer.hash_module
    dpo_trainer.hash_module = lambda _module: "replaced by PreferenceGuidedDPOTrainer._reference_key"
    try:
        yield
    finally:
        dpo_trainer.hash_module = original


class PreferenceGuidedDPOTrainer(FaultTolerantTrainer, DPOTrainer):
    """DPO on the base view, plus `ALPHA * aligned_loss` against the guided view (docs/method.md).

    Datasets must come from `views.tokenize_preference_dataset` and batches from
    `collator.PreferenceViewsCollator`. `prompt_embedding` ([k, hidden]) selects embedding mode.
    """

    def __init__(
        self, *args, prompt_embedding: torch.Tensor | None = None, reference_weights: str | None = None, **kwargs
    ):
        self.prompt_embedding = prompt_embedding
        self.reference_weights = reference_weights  # `cache.reference_weights_key`; None: hashed in memory
        config = kwargs.get("args")
        if config is not None and kwargs.get("eval_dataset") is None and config.eval_on_start:
            config.eval_on_start = False  # our default evaluates before training; without a test set there is none
        with trl_weight_hash_skipped():
            super().__init__(*args, **kwargs)
        self._restore_lora_dropout()
        self.form = form_for(self.args)
        if self.form.per_token:  # its logits are computed from hidden states
            causal_lm = self._unwrapped(self.model)[1]
            check_lm_head(causal_lm, lm_head_of(causal_lm), self.args.align_loss)
        # The base view's head pass scores a precomputed teacher with the labels. Under ZeRO-3 the head's weight is
        # sharded outside its own forward and a recomputed chunk could not see it: there TRL's head scores the
        # labels and the form its own logits, a second pass.
        self._head_pass = None if zero3() else install_head_pass(self._unwrapped(self.model)[1], lm_head_of)
        self._head_pass_logged = False
        if zero3() and self.eval_dataset is not None and self.accelerator.is_main_process:
            logger.warning(
                "The instruction gap is not measured under ZeRO-3 (ZERO_STAGE=3): it scores hidden states through "
                "the LM head, whose weight is sharded outside its forward. ZERO_STAGE=2 measures it."
            )
        self.train_dataset = self.form.prepare(self, self.train_dataset, "train")
        if self.eval_dataset is not None:
            self.eval_dataset = self.form.prepare(self, self.eval_dataset, "eval")

    def has_reference(self) -> bool:
        """Whether a frozen reference can run during training: a separate model, or the policy's adapter off."""
        return self.ref_model is not None or hasattr(self._unwrapped(self.model)[0], "peft_config")

    def _reference_key(self, trl_columns: bool = False) -> str:
        """What the precomputed reference values depend on besides the pairs' tokens (the data set's fingerprint,
        the teacher store's content hash): the reference's weights (not the adapter's random initial values, which
        TRL's `hash_module(model)` would add) and the settings that change them. TRL's columns (`trl_columns`) also
        depend on `ld_alpha`, which weighs the response tokens past the shorter response's length."""
        if self.reference_weights is None:
            self.reference_weights = base_weights_hash(self._unwrapped(self.ref_model or self.model)[0])
        # The collator cuts at max_length (truncation_mode; the views already fit, so nothing is cut today), and TRL
        # 1.16 turns padding_free off; the batch size and pad_to_multiple_of change float rounding only.
        settings = {name: getattr(self.args, name) for name in ("max_length", "truncation_mode", "padding_free")}
        if trl_columns:
            settings["ld_alpha"] = self.args.ld_alpha
        return make_key({"weights": self.reference_weights, "settings": settings})

    def _precompute_ref_logps(self, dataset, name, batch_size):
        self._precompute_model_hash = self._reference_key(trl_columns=True)  # the key of TRL's cache file
        log_reference_pass(dataset, self._precompute_model_hash, name, self.accelerator.is_main_process)
        with random_state_kept():  # a cache hit and a miss leave training the same random state
            return super()._precompute_ref_logps(dataset, name, batch_size)

    def precompute_reference_guided(self, dataset, name: str):
        """The reference model's guided-view log-probs of every pair, once, as two new columns (`ref_hinge`);
        reused across runs from a file beside the data set, keyed like TRL's reference columns plus the soft
        prompt and the guided-forward layout."""
        soft = (
            "" if self.prompt_embedding is None else hashlib.sha256(self.prompt_embedding.numpy().tobytes()).hexdigest()
        )
        fingerprint = reference_fingerprint(
            dataset, self._reference_key(), "ref_guided", soft, self.args.guided_forward
        )
        what = f"the reference's guided-view log-probs of the {name} pairs"
        with random_state_kept():
            return cached_columns(
                dataset, fingerprint, lambda: self._ref_guided_columns(dataset, name), self.accelerator, what
            )

    def _ref_guided_columns(self, dataset, name: str) -> dict[str, list[float]]:
        from torch.utils.data import DataLoader

        loader = self.accelerator.prepare(
            DataLoader(dataset, batch_size=self.args.precompute_ref_batch_size or self.args.per_device_eval_batch_size,
                       collate_fn=self.data_collator, shuffle=False, num_workers=self.args.dataloader_num_workers)
        )  # fmt: skip
        model, adapter_off = self._reference(self._precompute_policy())
        chosen, rejected = [], []
        was_training = self.model.training
        self.model.eval()
        with adapter_off:
            for batch in loader:
                _, guided = split_views(batch)
                logps = self._guided_logps(model, guided)
                c, r = self.accelerator.gather_for_metrics((logps.chosen, logps.rejected))
                chosen.append(c.float().cpu())
                rejected.append(r.float().cpu())
        self.model.train(was_training)
        logger.info("Computed the reference's guided-view log-probs for %d %s pairs", len(dataset), name)
        return {
            REFERENCE_GUIDED_COLUMNS[0]: torch.cat(chosen).tolist(),
            REFERENCE_GUIDED_COLUMNS[1]: torch.cat(rejected).tolist(),
        }

    def precompute_context_answers(self, dataset, name: str):
        """ALIGN_LOSS=context_distill: the frozen reference's greedy answer, WITH the instruction, to every pair's
        prompt, once, as a new column (`CONTEXT_ANSWER_COLUMN`); reused across runs from a file beside the data set,
        keyed like the reference's guided-view columns plus the answers' length bound and the generation code's
        version."""
        import transformers

        soft = (
            "" if self.prompt_embedding is None else hashlib.sha256(self.prompt_embedding.numpy().tobytes()).hexdigest()
        )
        fingerprint = reference_fingerprint(
            dataset, self._reference_key(), "context_answers", soft, self.args.on_policy_max_new_tokens,
            transformers.__version__,
        )  # fmt: skip
        what = f"the reference's instructed answers to the {name} prompts"
        with random_state_kept():
            return cached_columns(
                dataset, fingerprint, lambda: self._context_answer_columns(dataset, name), self.accelerator, what
            )

    def _context_answer_columns(self, dataset, name: str) -> dict[str, list[list[int]]]:
        """Greedy answers of the reference to the guided prompts, each up to and including its first end-of-sequence
        token; ranks answer disjoint batches (every rank's answers padded to one width, then gathered)."""
        from torch.utils.data import DataLoader
        from tqdm.auto import tqdm
        from transformers import GenerationConfig

        loader = self.accelerator.prepare(
            DataLoader(dataset, batch_size=self.args.precompute_ref_batch_size or self.args.per_device_eval_batch_size,
                       collate_fn=self.data_collator, shuffle=False, num_workers=self.args.dataloader_num_workers)
        )  # fmt: skip
        pad, eos = self.processing_class.pad_token_id, self.processing_class.eos_token_id
        width = self.args.on_policy_max_new_tokens
        config = GenerationConfig(max_new_tokens=width, do_sample=False, pad_token_id=pad, eos_token_id=eos)
        model, adapter_off = self._reference(self._precompute_policy())
        unwrapped = self._unwrapped(model)[0]
        answers: list[list[int]] = []
        was_training = self.model.training
        self.model.eval()
        progress = tqdm(loader, desc=f"Answering the {name} prompts with the instruction", unit="batch",
                        disable=not self.accelerator.is_local_main_process)  # fmt: skip
        with torch.no_grad(), evaluation_mode(unwrapped), adapter_off:
            for batch in progress:
                _, guided = split_views(batch)
                ids, mask = guided["prompt_input_ids"], guided["prompt_attention_mask"]  # left-padded
                inputs = {"input_ids": ids}
                if "prompt_soft_token_mask" in guided:  # embedding mode: the soft prompt ends each guided prompt
                    embeds = unwrapped.get_input_embeddings()(ids)
                    inputs = {"inputs_embeds": self._insert_soft_tokens(embeds, guided["prompt_soft_token_mask"])}
                new = unwrapped.generate(**inputs, attention_mask=mask, generation_config=config)
                if "input_ids" in inputs:  # generate returns the prompt before the answer (not after embeddings)
                    new = new[:, ids.size(1) :]
                new = torch.nn.functional.pad(new, (0, width - new.size(1)), value=pad)
                for row in self.accelerator.gather_for_metrics(new).tolist():
                    answers.append(row[: row.index(eos) + 1] if eos in row else row)
        self.model.train(was_training)
        logger.info("Computed the reference's instructed answers to %d %s prompts", len(answers), name)
        return {CONTEXT_ANSWER_COLUMN: answers}

    def _precompute_policy(self):
        """The policy to run a pass before training through (its adapter off, it is the reference).

        Before `train` prepares the policy, DeepSpeed keeps its parameters on CPU (ZeRO-2) or sharded (ZeRO-3):
        such passes go through TRL's inference engine, built here when TRL's own precompute (off with
        --precompute_ref_log_probs false) has not built it."""
        if self.ref_model is not None or not self.is_deepspeed_enabled:
            return self.model
        if self._precompute_engine is None:
            from trl.models import prepare_deepspeed

            self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
        return self._precompute_engine

    def _restore_lora_dropout(self) -> None:
        """Give the trained adapter's LoRA dropout back the rate LORA_DROPOUT set.

        TRL's `disable_dropout` (on by default) sets every `nn.Dropout` to p=0, LoRA's included, which would
        silently ignore LORA_DROPOUT. The base model's own dropout stays off, as TRL wants. LoRA dropout acts on
        forwards in training mode, i.e. the policy's forward with gradient: the guided view and evaluation run
        in eval mode (`evaluation_mode`), and the reference is the adapter disabled or a separate model.
        """
        from peft.tuners.lora import LoraLayer

        unwrapped, _ = self._unwrapped(self.model)
        if not self.args.disable_dropout or not hasattr(unwrapped, "peft_config"):
            return
        for module in unwrapped.modules():
            if not isinstance(module, LoraLayer):
                continue
            for adapter in unwrapped.active_adapters:  # not an initial copy kept as "ref": it is never trained
                if adapter in module.lora_dropout and isinstance(module.lora_dropout[adapter], torch.nn.Dropout):
                    module.lora_dropout[adapter].p = unwrapped.peft_config[adapter].lora_dropout

    def _reference(self, model):
        """(the frozen reference to call, the context that makes it one): the separate reference model, or
        `model` (the policy) with its LoRA adapter off, as TRL's reference (its "ref" adapter, if it has one)."""
        from trl.trainer.utils import use_adapter

        if self.ref_model is not None:
            return self.ref_model, contextlib.nullcontext()
        unwrapped, _ = self._unwrapped(self.model)
        if hasattr(unwrapped, "peft_config"):
            return model, use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        return model, contextlib.nullcontext()  # no adapter: the policy before training (precompute only)

    def precompute_topk_teacher(self, dataset, name: str):
        """The reference's top-K guided teacher of every pair, once, as new columns (`teacher.py`)."""
        from accelerate.utils import broadcast_object_list

        from .teacher import CACHE_TEACHER_DIR, TEACHER_DIR, precompute_columns, split_rows, store_key

        policy = self._precompute_policy()
        key = [store_key(dataset, self.args.distill_top_k, self._reference_key(), self.prompt_embedding)]
        broadcast_object_list(key, from_process=0)  # one store for all ranks
        _, teacher_lm = self._unwrapped(self._reference(policy)[0])

        def score(examples):
            _, guided = split_views(self._prepare_inputs(self.data_collator(examples)))
            model, adapter_off = self._reference(policy)
            with adapter_off:
                reference = self._guided_logps(model, guided, with_hidden=True)
            head = lm_head_of(teacher_lm)
            rows = [topk_teacher(head.logits(h), self.args.distill_top_k) for h in reference.hidden.split(256)]
            ids, top_logps, log_rest = (torch.cat(part) for part in zip(*rows, strict=True))
            teacher_chosen, teacher_rejected = split_rows(
                ids, top_logps, log_rest, guided["completion_attention_mask"].sum(1)
            )
            return {
                "teacher_chosen": teacher_chosen, "teacher_rejected": teacher_rejected,
                REFERENCE_GUIDED_COLUMNS[0]: reference.chosen.float().tolist(),
                REFERENCE_GUIDED_COLUMNS[1]: reference.rejected.float().tolist(),
            }  # fmt: skip

        # In the cache, a rerun with another seed, learning rate or ALPHA skips the teacher pass, as TRL's reference
        # pass is skipped; without it, the run's own folder (kept for a resume, removed when the run finishes).
        cached = self.args.cache
        folder = os.path.join(self.args.cache_dir, CACHE_TEACHER_DIR) if cached else os.path.join(
            self.args.output_dir, TEACHER_DIR)  # fmt: skip
        was_training = self.model.training
        self.model.eval()
        with random_state_kept():
            dataset = precompute_columns(
                dataset, name=name, folder=folder, key=key[0], score=score, accelerator=self.accelerator,
                batch_size=self.args.precompute_ref_batch_size or self.args.per_device_eval_batch_size,
                replace_others=not cached,
            )  # fmt: skip
        self.model.train(was_training)
        logger.info(
            "Top-%d teacher of the reference for %d %s pairs ready", self.args.distill_top_k, len(dataset), name
        )
        return dataset

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
        extra = (*GUIDED_COLUMNS, *REFERENCE_GUIDED_COLUMNS, *TEACHER_COLUMNS, CONTEXT_ANSWER_COLUMN)
        self._signature_columns = [*self._signature_columns, *(c for c in extra if c not in self._signature_columns)]

    def compute_ref_log_probs(self, model, inputs):
        base, _ = split_views(inputs)
        with input_grad_hooks_kept(self._unwrapped(self.model)[1]):
            return super().compute_ref_log_probs(model, base)

    # --- loss ---

    def _insert_soft_tokens(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Replace the placeholder embeddings at `mask` by the soft prompt, k rows per sequence, in order."""
        return insert_soft_tokens(embeds, mask, self.prompt_embedding)

    def _guided_logps(self, model, guided: dict[str, torch.Tensor], with_hidden: bool = False) -> GuidedLogps:
        """The guided view's summed response log-probs: `model`'s weights, no gradient, eval mode (no dropout);
        `with_hidden`: also its final hidden states at the response positions, in the base view's order."""
        # the unwrapped model: a DeepSpeed engine's own `training` flag stays True whatever mode its module is in
        with torch.no_grad(), evaluation_mode(self._unwrapped(model)[0]):
            if "prompt_input_ids" in guided:
                return self._guided_logps_shared_prompt(model, guided, with_hidden)
            return self._guided_logps_full(model, guided, with_hidden)

    def _guided_logps_shared_prompt(self, model, guided: dict[str, torch.Tensor], with_hidden: bool) -> GuidedLogps:
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

        def in_base_order(t: torch.Tensor) -> torch.Tensor:  # pairs interleaved -> chosen rows, then rejected
            return torch.cat([t[0::2], t[1::2]])

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
        if not with_hidden:
            logps = model(**response_pass, labels=labels, fused_lm_head=True).log_probs.sum(dim=1)
            return GuidedLogps(logps[0::2], logps[1::2])
        hidden = causal_lm.base_model(**response_pass).last_hidden_state
        logps, hidden, scored = self._scored_from_hidden(causal_lm, hidden, labels)
        return GuidedLogps(logps[0::2], logps[1::2], in_base_order(hidden)[in_base_order(scored)])

    def _guided_logps_full(self, model, guided: dict[str, torch.Tensor], with_hidden: bool) -> GuidedLogps:
        """Whole guided sequences, chosen and rejected each with its own copy of the prompt (rows: chosen...,
        rejected..., the base view's order)."""
        labels = guided["input_ids"].masked_fill(guided["completion_mask"] == 0, -100)
        kwargs: dict[str, Any] = {"attention_mask": guided["attention_mask"], "use_cache": False}
        unwrapped, causal_lm = self._unwrapped(model)
        if "soft_token_mask" in guided:
            embeds = unwrapped.get_input_embeddings()(guided["input_ids"])
            kwargs["inputs_embeds"] = self._insert_soft_tokens(embeds, guided["soft_token_mask"])
        else:
            kwargs["input_ids"] = guided["input_ids"]
        if not with_hidden:
            outputs = model(**kwargs, labels=labels, fused_lm_head=True)
            return GuidedLogps(*sequence_logps(outputs.log_probs, guided["completion_mask"]))
        hidden = causal_lm.base_model(**kwargs).last_hidden_state
        logps, hidden, scored = self._scored_from_hidden(causal_lm, hidden, labels)
        return GuidedLogps(*logps.chunk(2), hidden[scored])

    @staticmethod
    def _scored_from_hidden(causal_lm, hidden: torch.Tensor, labels: torch.Tensor):
        """(summed log-probs of each row's labelled tokens, the hidden states that predict a next token, which of
        them predict a labelled one), scored through the model's LM head from its final hidden states."""
        hidden, targets = hidden[:, :-1], labels[:, 1:]
        scored = targets != -100
        token_logps = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
        token_logps[scored] = token_logps_from_hidden(hidden[scored], lm_head_of(causal_lm), targets[scored])
        return token_logps.sum(dim=1), hidden, scored

    def _compute_loss(self, model, inputs, return_outputs):
        """TRL's DPO loss of the base view, plus ALPHA x the form's aligned loss, and the metrics of both."""
        mode = "train" if self.model.training else "eval"
        base, guided = split_views(inputs)
        unwrapped, causal_lm = self._unwrapped(model)
        weight = self.args.aligned_loss_weight
        scored = weight > 0 or mode == "eval"  # training with ALPHA=0 is plain DPO; evaluation measures every view
        views = self._guided_views(model, guided)
        # A teacher handed to the head pass is scored there, with the labels (`head_pass`); an exact one is the
        # teacher's guided view, computed now, before the base view's forward.
        teacher = self.form.head_teacher(guided, views) if scored and self._head_pass is not None else None
        # The base view's final hidden states from the same forward: the student (with gradient) of a per-token form
        # where no head pass took its teacher, and in evaluation the instruction gap's (kept by autograd anyway).
        hidden = self.form.per_token or mode == "eval"
        backbone = capture_outputs(causal_lm.base_model, fused_only=False) if hidden else contextlib.nullcontext()
        head_pass = self._head_pass.serving(teacher) if teacher is not None else contextlib.nullcontext()
        with (
            capture_outputs(unwrapped) as captured,
            backbone as backbone_outputs,
            input_grad_hooks_kept(causal_lm),
            head_pass as served,
        ):
            result = super()._compute_loss(model, base, return_outputs)
        dpo_loss = result[0] if return_outputs else result
        metrics = self._metrics[mode]
        metrics["dpo_loss"].append(self._mean(dpo_loss))
        loss, aligned = dpo_loss, None
        if scored:
            form_inputs = self._form_inputs(mode, base, guided, views, captured[0], backbone_outputs)
            form_inputs.head_kl = None if served is None else served.kl
            if served is not None and not self._head_pass_logged:
                self._log_head_pass(served.kl is not None)
            aligned = self.form.loss(form_inputs)
            if weight > 0:
                loss = dpo_loss + weight * aligned
            self._log_form_metrics(metrics, form_inputs, aligned)
        if mode == "train":
            loss = self._check_finite(loss, dpo_loss, aligned)
        return (loss, result[1]) if return_outputs else loss

    def _log_head_pass(self, taken: bool) -> None:
        """Say once, in the log file, where the teacher was scored: the path decides the step's time and memory."""
        self._head_pass_logged = True
        where = (
            "in the policy's own LM-head pass, with DPO's log-probs"
            if taken  # a forward with router logits or shift_labels goes through TRL's head, and the form's own pass
            else "in a second LM-head pass (the policy's forward went through TRL's fused head)"
        )
        details.info("%s: the teacher is scored %s", self.args.align_loss, where)

    def _guided_views(self, model, guided: dict[str, torch.Tensor]) -> GuidedViews:
        """The batch's guided views, each computed when first asked for, and the LM heads that score them."""
        _, causal_lm = self._unwrapped(model)

        def guided_pass(who: str, with_hidden: bool) -> GuidedLogps:
            if who == "policy":
                return self._guided_logps(model, guided, with_hidden)
            if "ref_chosen_logps" in guided and not with_hidden:  # precomputed (ref_hinge, top-K ref_distill)
                return GuidedLogps(guided["ref_chosen_logps"], guided["ref_rejected_logps"])
            reference, adapter_off = self._reference(model)
            with adapter_off:
                return self._guided_logps(reference, guided, with_hidden)

        def lm_heads(who: str) -> LMHead:
            if who == "reference" and self.ref_model is not None:
                return lm_head_of(self._unwrapped(self.ref_model)[1])
            return lm_head_of(causal_lm)

        return GuidedViews(guided_pass, lm_heads)

    def _form_inputs(self, mode, base, guided, views, base_output, backbone_outputs) -> FormInputs:
        """What this batch offers the form: the base view from TRL's forward, the guided views on demand."""
        response = base["completion_mask"][:, 1:].bool()
        student = None
        if backbone_outputs:
            student = backbone_outputs[0].last_hidden_state[:, :-1][response]

        def prompts() -> tuple[list[list[int]], list[list[int]]]:
            """(base prompts, guided prompts) of the batch's pairs, one each per pair."""
            pairs = base["input_ids"].size(0) // 2
            base_prompts = prompts_of(base["input_ids"], base["attention_mask"], base["completion_mask"], pairs)
            if "prompt_input_ids" in guided:  # shared-prompt layout: the guided prompts, left-padded
                ones = torch.ones_like(guided["prompt_attention_mask"])
                guided_prompts = prompts_of(
                    guided["prompt_input_ids"], guided["prompt_attention_mask"], 1 - ones, pairs
                )
            else:
                guided_prompts = prompts_of(
                    guided["input_ids"], guided["attention_mask"], guided["completion_mask"], pairs
                )
            return base_prompts, guided_prompts

        def score(answers: list[list[int]]) -> ScoredAnswers:
            """`answers`, one per pair, scored after the pair's base prompt (student) and guided prompt (teacher)."""
            return self.score_answers(*prompts(), answers)

        def answers() -> ScoredAnswers:
            """The policy's own answers to the pairs' prompts, scored after both views."""
            return score(self.generate_answers(prompts()[0]))

        return FormInputs(
            mode=mode,
            step=self.state.global_step,
            answers=answers,
            score=score,
            base=GuidedLogps(*sequence_logps(base_output.log_probs, base["completion_mask"])),
            batch=guided,
            response_lengths=response.sum(1),
            views=views,
            token_mean_divisor=self._token_mean_divisor,
            student_hidden=student,
        )

    def _log_form_metrics(self, metrics: dict[str, list[float]], inputs: FormInputs, aligned: torch.Tensor) -> None:
        """The metrics every form logs (docs/method.md, "Metrics"); the guided view's whenever the policy's guided
        forward ran (always in evaluation; in training for the forms whose teacher it is)."""
        h_base = inputs.base.margin.detach()
        metrics["accuracy_base"].append(self._mean((h_base > 0).float()))
        metrics["margin_base"].append(self._mean(h_base))
        if inputs.mode == "eval" or inputs.guided_computed("policy"):
            policy = inputs.guided("policy")
            stats = preference_stats(inputs.base.chosen, inputs.base.rejected, policy.chosen, policy.rejected)
            metrics["accuracy_guided"].append(self._mean((policy.margin > 0).float()))
            metrics["margin_guided"].append(self._mean(policy.margin))
            metrics["pref_advantage_ratio"].append(
                pref_advantage_ratio(self.accelerator.gather(stats.advantage)).item()
            )
            metrics["pref_delta_w"].append(self._mean(stats.delta_w))
            metrics["pref_delta_l"].append(self._mean(stats.delta_l))
        metrics["aligned_loss"].append(self._mean(aligned.detach()))
        metrics[f"{self.form.name}_loss"].append(metrics["aligned_loss"][-1])
        metrics["aligned_active_frac"].append(self._mean(aligned_active(self.form.target(inputs), h_base)))
        for key, value in self.form.metrics(inputs).items():
            metrics[key].append(self._mean(value))
        # without LoRA or REFERENCE_MODEL_PATH there is no reference; under ZeRO-3 the LM head's weight is sharded
        # outside its own forward, where the gap scores hidden states
        if inputs.mode == "eval" and self.has_reference() and not zero3():
            metrics["instruction_gap"].append(self._mean(self._instruction_gap(inputs)))

    @staticmethod
    def _instruction_gap(inputs: FormInputs) -> torch.Tensor:
        """The mean over the chosen responses' positions of KL(reference WITH the instruction || policy WITHOUT
        it), each through its own LM head (docs/method.md, "Instruction gap"); 0 for a batch without any."""
        chosen_positions = int(inputs.response_lengths[: inputs.base.chosen.numel()].sum())
        teacher = inputs.guided("reference", with_hidden=True).hidden[:chosen_positions]
        student_head, teacher_head = inputs.lm_heads("policy"), inputs.lm_heads("reference")
        with torch.no_grad():
            per_token = chunked_divergence(
                inputs.student_hidden[:chosen_positions], teacher, student_head, teacher_head
            )
        return per_token.mean() if chosen_positions else per_token.new_zeros(())

    def generated_instruction_gap(self, prompts, generated: list[list[int]]) -> float | None:
        """The instruction gap (docs/method.md) on the policy's own greedy answers to the sample prompts: the mean
        over their tokens of KL(reference with the instruction || policy without it), each scoring the same answer
        after its own view of the prompt (`report.SampleGenerations`). None without a reference or any token."""
        if not self.has_reference() or not any(generated) or zero3():
            return None
        with torch.no_grad(), evaluation_mode(self._unwrapped(self.model)[0]):
            scored = self.score_answers([p.base_ids for p in prompts], [p.guided_ids for p in prompts], generated)
            per_token = chunked_divergence(scored.student, scored.teacher, scored.student_head, scored.teacher_head)
        return per_token.mean().item()

    def score_answers(self, base_prompts: list[list[int]], guided_prompts: list[list[int]], answers: list[list[int]]):
        """Each answer after its base prompt through the policy (with gradient if enabled: the student) and after
        its guided prompt through the frozen reference (eval mode, no gradient: the teacher); their final hidden
        states at the positions that predict an answer token, answer after answer (`forms.base.ScoredAnswers`).

        Embedding mode: each guided prompt ends in the k placeholders the soft prompt replaces, as in the views.
        """
        pad = self.processing_class.pad_token_id
        device = self.accelerator.device

        def rows(prefixes: list[list[int]]):
            """Right-padded prompt + answer rows, and the positions that predict an answer token."""
            width = max(len(prefix) + len(answer) for prefix, answer in zip(prefixes, answers, strict=True))
            ids = torch.full((len(prefixes), width), pad, device=device)
            mask = torch.zeros((len(prefixes), width), dtype=torch.long, device=device)
            predicts = torch.zeros((len(prefixes), width), dtype=torch.bool, device=device)
            for i, (prefix, answer) in enumerate(zip(prefixes, answers, strict=True)):
                ids[i, : len(prefix) + len(answer)] = torch.tensor(prefix + answer, device=device)
                mask[i, : len(prefix) + len(answer)] = 1
                predicts[i, len(prefix) - 1 : len(prefix) + len(answer) - 1] = True
            return ids, mask, predicts

        def hidden(model, prefixes, soft: bool):
            ids, mask, predicts = rows(prefixes)
            unwrapped, causal_lm = self._unwrapped(model)
            kwargs = {"attention_mask": mask}
            if not soft:
                kwargs["input_ids"] = ids
            else:  # each guided prompt ends in k placeholders for the soft tokens
                k = self.prompt_embedding.shape[0]
                placeholders = torch.zeros_like(mask, dtype=torch.bool)
                for i, prefix in enumerate(prefixes):
                    placeholders[i, len(prefix) - k : len(prefix)] = True
                kwargs["inputs_embeds"] = self._insert_soft_tokens(unwrapped.get_input_embeddings()(ids), placeholders)
            return causal_lm.base_model(**kwargs).last_hidden_state[predicts], causal_lm

        student, student_lm = hidden(self.model, base_prompts, soft=False)
        reference, adapter_off = self._reference(self.model)
        with torch.no_grad(), evaluation_mode(self._unwrapped(reference)[0]), adapter_off:
            teacher, teacher_lm = hidden(reference, guided_prompts, soft=self.prompt_embedding is not None)
        lengths = torch.tensor([len(a) for a in answers], device=device)
        return ScoredAnswers(student, teacher, lengths, lm_head_of(student_lm), lm_head_of(teacher_lm))

    def generate_answers(self, prompts: list[list[int]]) -> list[list[int]]:
        """The policy's sampled answers to `prompts` (without the instruction): eval mode, no gradient, its own
        `generate` (every rank under ZeRO-3), --on_policy_temperature and --on_policy_max_new_tokens; each answer
        up to and including its first end-of-sequence token."""
        import time

        from transformers import GenerationConfig
        from transformers.integrations import is_deepspeed_zero3_enabled

        started = time.perf_counter()
        pad, eos = self.processing_class.pad_token_id, self.processing_class.eos_token_id
        device = self.accelerator.device
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)  # left-padded
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        config = GenerationConfig(
            max_new_tokens=self.args.on_policy_max_new_tokens, do_sample=True,
            temperature=self.args.on_policy_temperature, top_k=0, top_p=1.0, pad_token_id=pad, eos_token_id=eos,
        )  # fmt: skip
        unwrapped = self._unwrapped(self.model)[0]
        with torch.no_grad(), evaluation_mode(unwrapped):
            output = unwrapped.generate(
                input_ids=ids, attention_mask=mask, generation_config=config, synced_gpus=is_deepspeed_zero3_enabled()
            )
        self.generation_seconds = getattr(self, "generation_seconds", 0.0) + time.perf_counter() - started
        return [row[: row.index(eos) + 1] if eos in row else row for row in output[:, width:].tolist()]

    def _mean(self, value: torch.Tensor) -> float:
        """The mean over every rank's values (the figure a metric logs)."""
        return self.accelerator.gather(value.detach()).mean().item()

    def _token_mean_divisor(self, lengths: torch.Tensor) -> torch.Tensor | None:
        """What `token_mean` divides one micro-batch's KL sum by: N / (G x W), N the response positions of the
        optimizer step (all its G micro-batches, on all W ranks; `_get_num_items_in_batch`). The Trainer divides each
        micro-batch's loss by G and the data-parallel backend averages the gradients over the W ranks, so the step's
        loss is its KL summed over its N positions / N, however it is split (the same per-position weight as one
        batch of all N). Evaluation, and a call outside the training loop: N is this micro-batch's positions on all
        ranks, G = 1. The logged value, averaged over the step's micro-batches and ranks, is the step's token mean."""
        if self.args.distill_reduction != "token_mean":
            return None
        ranks = self.accelerator.num_processes
        step_tokens = getattr(self, "_step_response_tokens", None)
        if self.model.training and step_tokens is not None:
            micro_batches = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
            return step_tokens.clamp(min=1) / (micro_batches * ranks)
        total = lengths.sum()
        if ranks > 1:
            total = self.accelerator.gather(total.reshape(1)).sum()
        return total.clamp(min=1) / ranks

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        """`token_mean`: the response positions of one optimizer step's micro-batches on all ranks (the count that
        transformers makes of label tokens, which DPO batches do not have); passed to `compute_loss`."""
        if not self.form.per_token or self.args.distill_reduction != "token_mean":
            return super()._get_num_items_in_batch(batch_samples, device)
        count = torch.zeros((), dtype=torch.long, device=device)
        for batch in batch_samples:
            count += batch["completion_mask"][:, 1:].sum().to(device)  # the positions `forms.distill` scores
        if self.accelerator.num_processes > 1:
            count = self.accelerator.gather(count.reshape(1)).sum()
        return count

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # TRL's `compute_loss` drops `num_items_in_batch`; `_token_mean_divisor` reads it
        self._step_response_tokens = num_items_in_batch
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def _check_finite(self, loss, dpo_loss, aligned):
        """The loss, a skipped batch's zero, or `NonFiniteLossError` naming its parts (`faults.FaultTolerantTrainer`)."""

        def what() -> str:
            parts = f"dpo_loss={dpo_loss.item():.4g}"
            if aligned is not None:
                parts += f", aligned_loss={aligned.item():.4g}, ALPHA={self.args.aligned_loss_weight:g}"
            return f"training loss is {loss.item()} ({parts})"

        return self._finite_or_skipped(loss, what, "Lower LEARNING_RATE or ALPHA")
