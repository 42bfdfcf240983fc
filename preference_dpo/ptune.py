"""The stage that learns the soft prompt embedding mode reads (`STAGE=ptune`): P-tuning on the preference pairs.

docs/method.md, "Learned preference prompt": `k` vectors `E` are inserted where embedding mode inserts them
(right after the prompt: the same tokenization, collator and `soft_prompt.insert_soft_tokens`), the model is
frozen (no LoRA), and only `E` is trained, directly or through PEFT's `PromptEncoder` MLP (P-tuning):
- `dpo`: the prompted model is the policy, the same model without `E` the reference;
- `sft`: the likelihood of the chosen responses with `E`.
The stage shares the DPO stage's config, data loading, views, checkpoints and TensorBoard writer, and runs
under the same launcher forms (one process, CPU ranks, DeepSpeed on GPUs). Its result, in PTUNE_OUTPUT_DIR,
is what embedding mode reads: `prompt_embeddings.pt` (`{"prompt_embeddings": [k, hidden]}`, float32) and the
same tensor as `prompt_embeddings.safetensors`, then `prompt_embeddings.json` (settings and final metrics),
written last: without it the stage is unfinished and a rerun resumes from its last complete checkpoint.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer

from .cache import file_backed
from .checkpoints import checkpoints, move_into, resume_settings
from .collator import PreferenceViewsCollator, split_views
from .config import DataArguments, ModelArguments, PreferenceDPOConfig
from .errors import UserInputError
from .faults import FaultTolerantTrainer, starting_checkpoint, stop_on_signal
from .losses import preference_accuracy_and_margin, prompt_dpo_loss, prompt_sft_loss
from .soft_prompt import insert_soft_tokens
from .stage import (
    STAGING_DIR,
    TOKENIZED_DIR,
    Trained,
    check_causal_lm,
    library_versions,
    load_tokenizer,
    model_dtype,
    tokenize_settings,
    train_and_evaluate,
)
from .variables import describe

logger = logging.getLogger(__name__)

EMBEDDING_KEY = "prompt_embeddings"
EMBEDDING_FILE = "prompt_embeddings.pt"
SAFETENSORS_FILE = "prompt_embeddings.safetensors"
SUMMARY_FILE = "prompt_embeddings.json"  # written last: its presence means the stage finished
PROMPT_PREFIX = "prompt_encoder."  # state-dict keys of the trainable part

# rows of the held-out comparison, in the order they are reported
COMPARISON_ROWS = {
    "without_prompt": "without a prompt",
    "preference_text": "PREFERENCE_TEXT instruction",
    "initial_prompt": "initial soft prompt",
    "learned_prompt": "learned soft prompt",
}


class SoftPromptModel(torch.nn.Module):
    """A frozen causal LM and `k` trainable soft tokens, placed where embedding mode places them.

    `forward` returns each row's summed response log-prob, scored by TRL's fused LM head as the DPO stage
    scores it. The state dict is the prompt encoder alone: the frozen model comes from its own path, so the
    Trainer's and DeepSpeed's checkpoints hold the prompt and its optimizer state, not a copy of the model.
    """

    def __init__(self, model: torch.nn.Module, prompt_encoder: torch.nn.Module, num_virtual_tokens: int):
        super().__init__()
        self.model = model
        self.prompt_encoder = prompt_encoder
        self.register_buffer("token_indices", torch.arange(num_virtual_tokens), persistent=False)

    @property
    def config(self):
        """The frozen model's config (DeepSpeed's `auto` bucket sizes are read from its hidden size)."""
        return self.model.config

    def prompt(self) -> torch.Tensor:
        """The soft prompt `E` [k, hidden] (the MLP's output with PTUNE_ENCODER=mlp)."""
        return self.prompt_encoder(self.token_indices)

    @torch.no_grad()
    def snapshot(self) -> torch.Tensor:
        """A detached float32 copy of the prompt as it is now."""
        return self.prompt().detach().float().clone()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        completion_mask: torch.Tensor,
        soft_token_mask: torch.Tensor | None = None,
        soft_prompt: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Summed log-probs of the completion tokens of each row; the placeholders at `soft_token_mask` hold
        `E` (or `soft_prompt`, a fixed [k, hidden] tensor, for comparisons)."""
        embeds = self.model.get_input_embeddings()(input_ids)
        if soft_token_mask is not None:
            embeds = insert_soft_tokens(embeds, soft_token_mask, self.prompt() if soft_prompt is None else soft_prompt)
        labels = input_ids.masked_fill(completion_mask == 0, -100)
        outputs = self.model(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
        return outputs.log_probs.sum(dim=1)

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        return self.prompt_encoder.state_dict(
            destination=destination, prefix=prefix + PROMPT_PREFIX, keep_vars=keep_vars
        )

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        own = {key.removeprefix(PROMPT_PREFIX): value for key, value in state_dict.items()}
        return self.prompt_encoder.load_state_dict(own, strict=strict, assign=assign)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)


def build_prompt_encoder(
    model, tokenizer_path: str, train_args: PreferenceDPOConfig, revision: str | None = None
) -> torch.nn.Module:
    """PEFT's prompt-tuning embedding (PTUNE_ENCODER=none) or P-tuning MLP encoder (mlp), initialised from the
    token embeddings of PREFERENCE_TEXT, repeated or cut to k (PTUNE_INIT=text; PEFT loads the tokenizer at
    `tokenizer_path`, `revision` for a Hub id), or from k random rows of the vocabulary (vocab). With the MLP,
    its input vectors get that initialisation."""
    from peft import PromptEmbedding, PromptEncoder, PromptEncoderConfig, PromptTuningConfig

    hidden = model.config.get_text_config().hidden_size
    shape = {"num_virtual_tokens": train_args.num_virtual_tokens, "token_dim": hidden, "num_transformer_submodules": 1}
    if train_args.ptune_init == "text":
        init = {
            "prompt_tuning_init": "TEXT",
            "prompt_tuning_init_text": train_args.preference_text,
            "tokenizer_name_or_path": tokenizer_path,
            "tokenizer_kwargs": {"revision": revision} if revision else None,
        }
    else:
        init = {"prompt_tuning_init": "SAMPLE_VOCAB"}
    embedding = PromptEmbedding(PromptTuningConfig(**shape, **init), model.get_input_embeddings())
    if train_args.ptune_encoder == "none":
        return embedding
    encoder = PromptEncoder(
        PromptEncoderConfig(**shape, encoder_reparameterization_type="MLP", encoder_hidden_size=hidden)
    )
    with torch.no_grad():
        encoder.embedding.weight.copy_(embedding.embedding.weight)
    return encoder


class SoftPromptTrainer(FaultTolerantTrainer, Trainer):
    """transformers' `Trainer` on a `SoftPromptModel`: the objective and its metrics (NaN/Inf losses and complete
    checkpoints as in the DPO stage: `faults.FaultTolerantTrainer`).

    Batches come from `collator.PreferenceViewsCollator(guided_forward="full")`: the base view is the prompt
    without `E`, the guided view the prompt followed by the `k` placeholders.
    """

    def __init__(self, *args, objective: str, beta: float, **kwargs):
        self.objective = objective
        self.beta = beta
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        super().__init__(*args, **kwargs)

    def _set_signature_columns_if_needed(self):
        self._signature_columns = ["prompt_ids", "chosen_ids", "rejected_ids", "guided_prompt_ids"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        base, guided = split_views(inputs)
        prompted = model(
            guided["input_ids"], guided["attention_mask"], guided["completion_mask"], guided["soft_token_mask"]
        )
        chosen, rejected = prompted.chunk(2)
        if self.objective == "dpo":
            with torch.no_grad():  # the reference: the same frozen model without the prompt
                plain_chosen, plain_rejected = model(
                    base["input_ids"], base["attention_mask"], base["completion_mask"]
                ).chunk(2)
            loss = prompt_dpo_loss(chosen, rejected, plain_chosen, plain_rejected, self.beta)
        else:
            loss = prompt_sft_loss(chosen, guided["completion_mask"][: chosen.size(0)].sum(dim=1))
        accuracy, margin = preference_accuracy_and_margin(chosen, rejected)
        gather = self.accelerator.gather
        self._metrics[mode]["accuracy"].append(gather(accuracy).mean().item())
        self._metrics[mode]["margin"].append(gather(margin).mean().item())
        if mode == "train":
            loss = self._finite_or_skipped(loss, lambda: f"P-tuning loss is {loss.item()}", "Lower PTUNE_LEARNING_RATE")
        return (loss, prompted) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # As TRL's trainers do: the per-batch metrics, averaged over the logging window, join the Trainer's.
        mode = "train" if self.model.training else "eval"
        metrics = {key: sum(values) / len(values) for key, values in self._metrics[mode].items() if values}
        if mode == "eval":
            metrics = {f"eval_{key}": value for key, value in metrics.items()}
        logs.update(metrics)
        super().log(logs, start_time)
        self._metrics[mode].clear()

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if self.is_deepspeed_enabled and self.deepspeed.zero_optimization_partition_weights():
            # ZeRO-3: gather the prompt's shards only, not the whole frozen model (transformers gathers everything
            # unless the model is a PEFT model).
            state_dict = self.deepspeed._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)
            if self.args.should_save:
                self._save(output_dir, state_dict=state_dict)
            return
        super().save_model(output_dir, _internal_call)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if state_dict is not None:  # a gathered state dict may name every parameter: keep the prompt's
            state_dict = {key: value for key, value in state_dict.items() if key.startswith(PROMPT_PREFIX)}
        super()._save(output_dir, state_dict)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.is_deepspeed_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        # DeepSpeed would store the frozen model in every checkpoint (transformers leaves it out for PEFT
        # models only); it is reloaded from its own path on resume, so only the prompt's state is kept.
        engine = self.model_wrapped
        engine.save_checkpoint = functools.partial(type(engine).save_checkpoint, engine, exclude_frozen_parameters=True)
        try:
            super()._save_optimizer_and_scheduler(output_dir)
        finally:
            del engine.save_checkpoint  # back to the class's method


# --- outputs -------------------------------------------------------------------------------------------------


def check_prompt_output_dir(folder: str, overwrite: bool) -> None:
    """A learned prompt in `folder` is kept unless OVERWRITE asks (`UserInputError`, before any weights load)."""
    if (Path(folder) / SUMMARY_FILE).is_file() and not overwrite:
        raise UserInputError(
            f"{describe('ptune_output_dir')} {folder!r} already holds a learned prompt ({SUMMARY_FILE}); set "
            f"{describe('overwrite')}=true to replace it, or choose another PTUNE_OUTPUT_DIR."
        )


def clear_previous_prompt(folder: Path, log_dir: str | None = None) -> None:
    """OVERWRITE: drop the old prompt (its completion marker first), its checkpoints, and this stage's TensorBoard
    event files in `log_dir` (the DPO stage's, in the same folder, are kept)."""
    from .metrics import remove_stage_event_files

    for name in (SUMMARY_FILE, EMBEDDING_FILE, SAFETENSORS_FILE):
        (folder / name).unlink(missing_ok=True)
    for _, path in checkpoints(folder):
        shutil.rmtree(path)
    removed = remove_stage_event_files(log_dir, ptune=True) if log_dir else []
    if removed:
        logger.warning(
            "OVERWRITE: removed the previous ptune stage's TensorBoard event file(s) from %s: %s",
            log_dir,
            ", ".join(removed),
        )


def save_prompt(trainer: SoftPromptTrainer, output_dir: Path, summary: dict) -> torch.Tensor:
    """Write `E` ([k, hidden], float32) as .pt and .safetensors, then the JSON summary, through a staging folder."""
    from peft.utils.integrations import gather_params_ctx
    from safetensors.torch import save_file

    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    with gather_params_ctx(list(unwrapped.prompt_encoder.parameters())), torch.no_grad():  # ZeRO-3: every rank
        embeddings = unwrapped.prompt().detach().float().cpu().contiguous()
    if trainer.is_world_process_zero():
        staging = output_dir / STAGING_DIR
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        torch.save({EMBEDDING_KEY: embeddings}, staging / EMBEDDING_FILE)
        save_file({EMBEDDING_KEY: embeddings}, str(staging / SAFETENSORS_FILE))
        # safetensors writes 0600; give the file the permissions torch.save's file got from the umask
        os.chmod(staging / SAFETENSORS_FILE, os.stat(staging / EMBEDDING_FILE).st_mode & 0o777)
        summary = {**summary, "prompt_embeddings": {"key": EMBEDDING_KEY, "shape": list(embeddings.shape)}}
        text = json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n"
        (staging / SUMMARY_FILE).write_text(text, encoding="utf-8")
        move_into(staging, output_dir, last=SUMMARY_FILE)
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        shutil.rmtree(output_dir / TOKENIZED_DIR, ignore_errors=True)  # a per-run cache, rebuilt on every start
    return embeddings


# --- the held-out comparison -----------------------------------------------------------------------------------


def pair_margins(trainer: SoftPromptTrainer, dataset, collator, prompts: dict[str, torch.Tensor | None]):
    """Per pair of `dataset`, `logp(y_w|c) - logp(y_l|c)` for c = the prompt alone (`without_prompt`) and, for each
    entry of `prompts`, its guided view (a soft prompt tensor, None for the learned one, or the text instruction
    when the dataset was tokenized in text mode). All ranks take part; every rank gets every pair."""
    from torch.utils.data import DataLoader

    loader = trainer.accelerator.prepare(
        DataLoader(dataset, batch_size=trainer.args.per_device_eval_batch_size, collate_fn=collator, shuffle=False)
    )
    model = trainer.model_wrapped
    model.eval()
    margins: dict[str, list[torch.Tensor]] = defaultdict(list)
    with torch.no_grad():
        for batch in loader:
            base, guided = split_views(batch)
            views = {"without_prompt": model(base["input_ids"], base["attention_mask"], base["completion_mask"])}
            for name, soft_prompt in prompts.items():
                views[name] = model(
                    guided["input_ids"],
                    guided["attention_mask"],
                    guided["completion_mask"],
                    soft_token_mask=guided.get("soft_token_mask"),
                    soft_prompt=soft_prompt,
                )
            for name, logps in views.items():
                chosen, rejected = logps.chunk(2)
                margins[name].append(trainer.accelerator.gather_for_metrics(chosen - rejected).float().cpu())
    return {name: torch.cat(parts) for name, parts in margins.items()}


def summarize(margins: torch.Tensor) -> dict[str, float]:
    accuracy, margin = preference_accuracy_and_margin(margins, torch.zeros_like(margins))
    return {"accuracy": accuracy.item(), "margin": margin.item(), "pairs": margins.numel()}


def compare_prompts(trainer, soft_eval, text_eval, soft_collator, text_collator, initial_prompt) -> dict:
    """Held-out accuracy and margin without a prompt, with PREFERENCE_TEXT, and with the initial and learned prompt."""
    soft = pair_margins(trainer, soft_eval, soft_collator, {"initial_prompt": initial_prompt, "learned_prompt": None})
    comparison = {name: summarize(values) for name, values in soft.items()}
    if text_eval is not None:
        text = pair_margins(trainer, text_eval, text_collator, {"preference_text": None})
        comparison["preference_text"] = summarize(text["preference_text"])
        if not torch.equal(text["without_prompt"], soft["without_prompt"]):
            # Pairs are dropped and responses cut so that the *guided* prompt fits MAX_PROMPT_LENGTH/MAX_LENGTH:
            # with a text instruction of another length than k, that can leave other tokens to score.
            comparison["without_prompt_text_view"] = summarize(text["without_prompt"])
    return {name: comparison[name] for name in (*COMPARISON_ROWS, "without_prompt_text_view") if name in comparison}


def log_comparison(comparison: dict, num_virtual_tokens: int, init: str) -> None:
    labels = {
        **COMPARISON_ROWS,
        "initial_prompt": f"initial soft prompt ({init})",
        "learned_prompt": f"learned soft prompt ({num_virtual_tokens} tokens)",
    }
    lines = [
        f"Held-out pairs ({comparison['without_prompt']['pairs']}): accuracy = share of pairs whose chosen response "
        "the model finds more likely; margin = mean logp(chosen) - logp(rejected), in nats"
    ]
    for key, label in labels.items():
        if key in comparison:
            row = comparison[key]
            lines.append(f"  {label:<34} accuracy {row['accuracy']:.3f}   margin {row['margin']:+8.3f}")
    if "without_prompt_text_view" in comparison:
        row = comparison["without_prompt_text_view"]
        lines.append(
            f"  (the instruction's view keeps {row['pairs']} pairs or cuts responses differently; without a prompt "
            f"on those: accuracy {row['accuracy']:.3f}, margin {row['margin']:+.3f})"
        )
    logger.info("\n".join(lines))
    worse = worse_than_no_prompt(comparison)
    if worse:
        logger.warning(
            "The learned soft prompt scores below no prompt on the held-out pairs (%s): DPO in embedding mode "
            "(STAGE=all's next stage) would guide the model with it. Train it longer (PTUNE_MAX_STEPS, PTUNE_EPOCHS), "
            "try PTUNE_OBJECTIVE=sft, or use the text instruction (TRAINING_MODE=text).",
            worse,
        )


def worse_than_no_prompt(comparison: dict) -> str:
    """What the learned prompt does worse than no prompt on the held-out pairs, in words ('' if nothing)."""
    learned, without = comparison.get("learned_prompt"), comparison.get("without_prompt")
    if not learned or not without:
        return ""
    worse = [
        f"{name} {learned[name]:.3f} against {without[name]:.3f}"
        for name in ("accuracy", "margin")
        if learned[name] < without[name]
    ]
    return "; ".join(worse)


# --- the stage ---------------------------------------------------------------------------------------------------


def use_stage_settings(train_args: PreferenceDPOConfig, has_test_set: bool) -> PreferenceDPOConfig:
    """The run's settings with this stage's own learning rate, length and output folder.

    Set on the parsed object, which this process uses for this stage alone: a second `TrainingArguments`
    would set up accelerate's state again, and on CPU ranks lose the gloo state the entry point configured
    (DeepSpeed's batch size would then count one rank).
    """
    train_args.learning_rate = train_args.ptune_learning_rate
    train_args.num_train_epochs = train_args.ptune_epochs
    train_args.max_steps = train_args.ptune_max_steps
    train_args.output_dir = train_args.ptune_output_dir
    if not has_test_set:
        train_args.eval_strategy = "no"
        train_args.eval_on_start = False
    return train_args


def run(data_args: DataArguments, model_args: ModelArguments, train_args: PreferenceDPOConfig) -> dict:
    """Learn the soft prompt and write it; return the held-out comparison (empty without a test set)."""
    started = time.monotonic()
    check_inputs(model_args, train_args)  # everything checkable without weights
    tokenizer = load_tokenizer(model_args, train_args)
    data = tokenize(data_args, train_args, tokenizer)
    args = use_stage_settings(train_args, has_test_set=data.eval_dataset is not None)
    output_dir = Path(args.output_dir)
    data = data.file_backed(output_dir / TOKENIZED_DIR, args)
    settings = resume_settings(args, model_args, data_args)  # what each checkpoint records, as parsed
    resume_from = starting_checkpoint(args, lambda: clear_previous_prompt(output_dir, args.log_dir), settings)
    soft_model = load_soft_prompt_model(model_args, args)
    initial_prompt = soft_model.snapshot()  # the comparison's "initial soft prompt" row
    trainer, tensorboard, stopper = build_trainer(soft_model, tokenizer, args, data)
    trainer.recorded_settings = settings
    has_test_set = data.eval_dataset is not None
    trained = train_and_evaluate(trainer, stopper, resume_from, output_dir, tensorboard, has_test_set)
    comparison = {}
    if has_test_set:
        comparison = compare_prompts(trainer, data.eval_dataset, data.text_eval, collator(tokenizer, args),
                                     collator(tokenizer, args, 0), initial_prompt)  # fmt: skip
    save_prompt(trainer, output_dir, run_summary(data_args, model_args, args, data, trainer, trained, comparison))
    if trainer.is_world_process_zero():
        if comparison:
            log_comparison(comparison, args.num_virtual_tokens, args.ptune_init)
        logger.info(
            "Learned a %d-token soft prompt in %d steps (%.0f s): %s, for TRAINING_MODE=embedding "
            "PROMPT_EMBEDDING_PATH=%s. TensorBoard in %s",
            args.num_virtual_tokens,
            trainer.state.global_step,
            time.monotonic() - started,
            output_dir / SUMMARY_FILE,
            output_dir / EMBEDDING_FILE,
            args.log_dir,
        )
    return comparison


def check_inputs(model_args: ModelArguments, train_args: PreferenceDPOConfig) -> None:
    """The prompt's output folder and the model's config, before any weights are loaded."""
    check_prompt_output_dir(train_args.ptune_output_dir, train_args.overwrite)
    remote = train_args.trust_remote_code
    # every load of the model's files at its revision: the DPO stage trains on this one
    check_causal_lm(model_args.model_name_or_path, "model_name_or_path", remote, model_args.model_revision)
    if model_args.reference_model_path:
        logger.info("REFERENCE_MODEL_PATH is for the DPO stage: here the reference is the model without the prompt.")


@dataclass
class Tokenized:
    """The pairs' views with k placeholders, and the test pairs with the text instruction (the comparison's row)."""

    train_dataset: Any
    eval_dataset: Any = None
    text_eval: Any = None

    def file_backed(self, folder: Path, args) -> Tokenized:
        """Every split written under `folder` and memory-mapped, as the DPO stage's (`cache.file_backed`)."""
        names = {"train_dataset": "train", "eval_dataset": "test", "text_eval": "test_text"}
        return Tokenized(**{
            field: None if getattr(self, field) is None else file_backed(getattr(self, field), folder / name, args)
            for field, name in names.items()
        })  # fmt: skip


def tokenize(data_args, train_args, tokenizer) -> Tokenized:
    from .data import load_train_and_test, warn_if_outside_chat_template
    from .views import tokenize_preference_dataset

    soft = tokenize_settings(train_args, train_args.num_virtual_tokens)
    train_pairs, test_pairs = load_train_and_test(data_args)
    if train_args.process_index == 0:
        warn_if_outside_chat_template(train_pairs, tokenizer, data_args.train_dataset_path)
    data = Tokenized(tokenize_preference_dataset(train_pairs, tokenizer, name="train", **soft))
    if test_pairs is None:
        return data
    data.eval_dataset = tokenize_preference_dataset(test_pairs, tokenizer, name="test", **soft)
    if train_args.preference_text.strip():
        try:
            text = {**soft, "num_soft_tokens": 0}
            data.text_eval = tokenize_preference_dataset(test_pairs, tokenizer, name="test (text instruction)", **text)
        except UserInputError as e:  # only the comparison row needs it
            logger.warning("No PREFERENCE_TEXT row in the comparison: %s", e)
    return data


def load_soft_prompt_model(model_args: ModelArguments, args: PreferenceDPOConfig) -> SoftPromptModel:
    """The frozen model, with TRL's fused LM head scoring the responses as in the DPO stage, and the prompt."""
    from transformers import AutoModelForCausalLM, set_seed
    from trl.trainer.utils import add_fused_lm_head, disable_dropout_in_model

    revision = model_args.model_revision
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path,
        revision=revision,
        dtype=model_dtype(args),
        trust_remote_code=args.trust_remote_code,
    )
    model.requires_grad_(False)
    if args.disable_dropout:
        disable_dropout_in_model(model)
    add_fused_lm_head(model)
    set_seed(args.seed)  # PTUNE_INIT=vocab and the MLP draw random numbers
    encoder = build_prompt_encoder(model, model_args.model_name_or_path, args, revision)
    soft_model = SoftPromptModel(model, encoder, args.num_virtual_tokens)
    logger.info(
        "Soft prompt: %d virtual tokens of size %d (init %s, encoder %s, %d trainable parameters), objective %s",
        args.num_virtual_tokens,
        soft_model.snapshot().shape[1],
        args.ptune_init,
        args.ptune_encoder,
        sum(p.numel() for p in soft_model.parameters() if p.requires_grad),
        args.ptune_objective,
    )
    return soft_model


def collator(tokenizer, args, num_soft_tokens: int | None = None) -> PreferenceViewsCollator:
    """Both views, the guided one with `num_soft_tokens` placeholders (default: the prompt's k)."""
    return PreferenceViewsCollator(
        pad_token_id=tokenizer.pad_token_id,
        max_length=args.max_length,
        num_soft_tokens=args.num_virtual_tokens if num_soft_tokens is None else num_soft_tokens,
        guided_forward="full",
    )


def build_trainer(soft_model, tokenizer, args, data: Tokenized):
    """(the trainer, its TensorBoard writer, the signal handler)."""
    from .metrics import PTUNE_EVENTS_SUFFIX, TensorBoardMetricsCallback, ptune_tensorboard_tag
    from .report import use_one_progress_bar

    tensorboard = TensorBoardMetricsCallback(
        args.log_dir, tag=ptune_tensorboard_tag, filename_suffix=PTUNE_EVENTS_SUFFIX
    )
    stopper = stop_on_signal(args)
    trainer = SoftPromptTrainer(
        model=soft_model,
        args=args,
        data_collator=collator(tokenizer, args),
        train_dataset=data.train_dataset,
        eval_dataset=data.eval_dataset,
        callbacks=[tensorboard, stopper],
        objective=args.ptune_objective,
        beta=args.beta,
    )
    use_one_progress_bar(trainer)
    return trainer, tensorboard, stopper


SUMMARY_SETTINGS = (
    "num_virtual_tokens", "ptune_objective", "ptune_init", "ptune_encoder", "ptune_learning_rate", "ptune_epochs",
    "ptune_max_steps", "beta", "preference_text", "preference_position", "max_length", "max_prompt_length",
    "per_device_train_batch_size", "gradient_accumulation_steps", "seed",
)  # fmt: skip


def run_summary(data_args, model_args, args, data: Tokenized, trainer, trained: Trained, comparison: dict) -> dict:
    """What `prompt_summary.json` records: the settings, the steps, the held-out comparison, the versions."""
    return {
        "settings": {
            "model_name_or_path": model_args.model_name_or_path,
            "model_revision": model_args.model_revision,
            "train_dataset_path": data_args.train_dataset_path,
            "test_dataset_path": data_args.test_dataset_path,
            **{name: getattr(args, name) for name in SUMMARY_SETTINGS},
        },
        "train_pairs": len(data.train_dataset),
        "global_step": trainer.state.global_step,
        "final_eval_metrics": trained.final_metrics,
        "held_out_comparison": comparison,
        "versions": library_versions(),
    }
