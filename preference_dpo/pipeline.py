"""The DPO stage, end to end: `run` is its recipe, one named step per function below.

Order matters for the user: everything that can be wrong with the inputs (data files, the model's
config, the embedding file, the token limits) is checked before any model weights are loaded. The steps the
soft-prompt stage shares (the tokenizer, training to the end with its signals and evaluation) are in
`stage.py`, the fault handling in `faults.py`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoints import RUN_CONFIG_NAME, clear_previous_run, move_into, resume_settings
from .config import DataArguments, ModelArguments, PreferenceDPOConfig
from .errors import UserInputError
from .faults import starting_checkpoint, stop_on_signal
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
from .teacher import TEACHER_DIR
from .variables import describe

logger = logging.getLogger(__name__)


def tokenized_views(split: str, path: str, raw, data_args, tokenizer, tokenize_kwargs: dict, train_args, cache):
    """One split's tokenized views of the loaded pairs `raw` and their meta (pairs loaded, the counts of dropped
    and truncated pairs, sample prompts), reused from `cache` if there (and the counts logged again).

    The data set is file-backed either way (the cache entry, or `OUTPUT_DIR/.tokenized` with the cache
    off) and memory-mapped by every rank: TRL's reference precompute keeps its results next to the data
    set's files, and an in-memory data set would give each process a private folder, where every rank
    but 0 fails to find rank 0's results.
    """
    from . import views
    from .cache import tokenized_key
    from .report import MAX_SAMPLE_PROMPTS, pick_sample_prompts

    built = []

    def build():
        dataset, counts = views.tokenize_preference_dataset(
            raw, tokenizer, name=split, return_counts=True, **tokenize_kwargs
        )
        built.append(split)
        meta = {"loaded": len(raw), "counts": counts}
        if split == "test":
            meta["sample_prompts"] = pick_sample_prompts(raw, MAX_SAMPLE_PROMPTS)
        return dataset, meta

    settings = {k: v for k, v in tokenize_kwargs.items() if k != "num_proc"}
    key = tokenized_key(split, path, data_args, tokenizer, settings)
    dataset, meta = cache.tokenized(split, key, build, train_args)
    if not built and train_args.process_index == 0 and "counts" in meta:
        views.log_pair_counts(meta["counts"])  # reused: the counts of when it was tokenized, again
    return dataset, meta


def check_lora_targets(config, targets, trust_remote_code: bool) -> None:
    """`UserInputError` unless every name in `targets` (LORA_TARGET_MODULES) is a module LoRA can adapt.

    Module names are not in the model's config, so they are read from the model built on the meta device
    (no weights, no memory); names match as in PEFT: the full module path or its last components.
    """
    if not isinstance(targets, list):
        return  # all-linear: PEFT finds the layers itself
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    nn = torch.nn
    adaptable = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention, Conv1D)
    modules = dict(model.named_modules())
    head = model.get_output_embeddings()
    missing, wrong, heads = [], [], []
    for name in targets:
        matched = [m for key, m in modules.items() if key == name or key.endswith(f".{name}")]
        if not matched:
            missing.append(repr(name))
        elif not all(isinstance(m, adaptable) for m in matched):
            kinds = sorted({type(m).__name__ for m in matched if not isinstance(m, adaptable)})
            wrong.append(f"{name!r} ({', '.join(kinds)})")
        elif any(m is head for m in matched):
            heads.append(repr(name))
    if missing or wrong or heads:
        found = sorted(
            {key.rsplit(".", 1)[-1] for key, m in modules.items() if key and isinstance(m, adaptable) and m is not head}
        )
        parts = [f"no module named {', '.join(missing)}"] if missing else []
        parts += [f"not a layer LoRA can adapt: {', '.join(wrong)}"] if wrong else []
        # TRL's fused LM head and this tool's head pass score every log-prob from the head's own weight, so a LoRA
        # on it would train nothing and change no log-prob: refused rather than ignored
        parts += (
            [f"{', '.join(heads)} is the LM head, which the log-probs are scored from without LoRA"] if heads else []
        )
        raise UserInputError(
            f"{describe('lora_target_modules')}: {'; '.join(parts)} in {type(model).__name__}. Its layers LoRA can "
            f"adapt: {', '.join(found)} (or all-linear)."
        )


def write_run_config(path: Path, data_args, model_args, train_args, extra: dict) -> None:
    """Every setting, resolved, plus library versions: enough to rerun or audit the run."""
    content = {
        "data": dataclasses.asdict(data_args),
        "model": dataclasses.asdict(model_args),
        "training": train_args.to_dict(),
        "versions": library_versions(),
        **extra,
    }
    path.write_text(json.dumps(content, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def run(data_args: DataArguments, model_args: ModelArguments, train_args: PreferenceDPOConfig) -> dict[str, float]:
    """Train and save; return the final evaluation metrics (empty without a test set)."""
    started = time.monotonic()
    checked = check_inputs(model_args, train_args)  # everything checkable without weights
    tokenizer = load_tokenizer(model_args, train_args)
    data = tokenize(data_args, model_args, train_args, tokenizer, checked)
    settings = resume_settings(train_args, model_args, data_args)  # what each checkpoint records, as parsed
    # before the summary: a refused resume prints only its error, and a resumed run's summary says it skips the
    # evaluation before training
    resume_from = starting_checkpoint(
        train_args, lambda: clear_previous_run(train_args.output_dir, train_args.log_dir), settings
    )
    log_start_summary(data_args, model_args, train_args, data, checked)
    model, ref_model = load_models(model_args, train_args)
    trainer, callbacks = build_trainer(model, ref_model, tokenizer, model_args, train_args, data, checked)
    trainer.recorded_settings = settings
    setup_seconds = time.monotonic() - started
    trained = train_and_evaluate(
        trainer, callbacks.stopper, resume_from, train_args.output_dir, callbacks.tensorboard,
        data.eval_dataset is not None, on_trained=lambda seconds: log_throughput(trainer, callbacks, seconds),
    )  # fmt: skip
    save_outputs(trainer, tokenizer, checked.config, data_args, model_args, train_args, trained.final_metrics,
                 len(data.train_dataset))  # fmt: skip
    if trainer.is_world_process_zero():
        data.cache.remove_fallback()  # the per-run copy of the tokenized pairs (cache off); every rank is done with it
        log_report(trainer, callbacks, trained, {"wall": time.monotonic() - started, "setup": setup_seconds})
    return trained.final_metrics


@dataclass
class Checked:
    """What the checks without weights found: the model's config and the soft prompt (embedding mode)."""

    config: Any
    prompt_embedding: Any = None  # torch.Tensor [k, hidden] in embedding mode

    @property
    def num_soft_tokens(self) -> int:
        return 0 if self.prompt_embedding is None else self.prompt_embedding.shape[0]


def check_inputs(model_args: ModelArguments, train_args: PreferenceDPOConfig) -> Checked:
    """The model configs, the top-K against the vocabulary, the LoRA targets and the soft prompt, before any
    weights are loaded (the data files are checked as they are read, in `tokenize`)."""
    from .soft_prompt import load_prompt_embedding

    remote = train_args.trust_remote_code
    config = check_causal_lm(model_args.model_name_or_path, "model_name_or_path", remote, model_args.model_revision)
    if model_args.reference_model_path:
        check_causal_lm(model_args.reference_model_path, "reference_model_path", remote)
    vocab_size = config.get_text_config().vocab_size
    if train_args.distill_top_k and train_args.distill_top_k > vocab_size:
        raise UserInputError(
            f"--distill_top_k {train_args.distill_top_k} exceeds the model's vocabulary ({vocab_size} tokens); "
            f"use at most {vocab_size} (the exact KL)."
        )
    if model_args.use_peft:
        check_lora_targets(config, model_args.lora_target_modules, remote)
    checked = Checked(config)
    if train_args.training_mode == "embedding":
        hidden_size = config.get_text_config().hidden_size
        checked.prompt_embedding = load_prompt_embedding(train_args.prompt_embedding_path, hidden_size)
        logger.info("Prompt embedding: %d virtual tokens of size %d", *checked.prompt_embedding.shape)
    return checked


@dataclass
class Tokenized:
    """Both views of the pairs, tokenized (file-backed), and what the reference's cached values are keyed on."""

    train_dataset: Any
    eval_dataset: Any
    sample_prompts: list
    settings: dict  # `stage.tokenize_settings`
    cache: Any  # `cache.DatasetCache`
    reference_weights: str


def tokenize(data_args, model_args, train_args, tokenizer, checked: Checked) -> Tokenized:
    """Read the pairs, tokenize both views (or reuse them from the cache), and turn evaluation off without a test
    set; also the reference's weights key, read once on the main process."""
    from .cache import MODEL_DIGESTS_DIR, DatasetCache, reference_weights_key
    from .data import load_train_and_test, warn_if_outside_chat_template
    from .faults import on_main_process

    settings = tokenize_settings(train_args, checked.num_soft_tokens)
    train_pairs, test_pairs = load_train_and_test(data_args)
    if train_args.process_index == 0:
        warn_if_outside_chat_template(train_pairs, tokenizer, data_args.train_dataset_path)
    cache = DatasetCache(Path(train_args.cache_dir), train_args.cache, Path(train_args.output_dir) / TOKENIZED_DIR)
    stamps = Path(train_args.cache_dir) / MODEL_DIGESTS_DIR if train_args.cache else None
    precision = (train_args.bf16, train_args.fp16)
    reference_weights = on_main_process(
        lambda: reference_weights_key(
            model_args.model_name_or_path, model_args.reference_model_path, precision, stamps, model_args.model_revision
        ),  # fmt: skip
        train_args,
    )  # what the precomputed reference values are keyed on (with the tokens and the settings that change them)
    views = (data_args, tokenizer, settings, train_args, cache)
    train_dataset, _ = tokenized_views("train", data_args.train_dataset_path, train_pairs, *views)
    eval_dataset, test_meta = None, {}
    if test_pairs is not None:
        eval_dataset, test_meta = tokenized_views("test", data_args.test_dataset_path, test_pairs, *views)
    elif train_args.eval_strategy != "no":
        logger.info("No test set: evaluation is off.")
        train_args.eval_strategy = "no"
    if eval_dataset is None or train_args.eval_strategy == "no":  # no evaluation during training: none before it
        train_args.eval_on_start = False
    sample_prompts = test_meta.get("sample_prompts", [])[: train_args.num_sample_prompts]
    return Tokenized(train_dataset, eval_dataset, sample_prompts, settings, cache, reference_weights)


def log_start_summary(data_args, model_args, train_args, data: Tokenized, checked: Checked) -> None:
    from . import report

    if train_args.process_index == 0:
        logger.info(
            report.summary(
                data_args,
                model_args,
                train_args,
                len(data.train_dataset),
                len(data.eval_dataset or []),
                checked.num_soft_tokens,
            )  # fmt: skip
        )


def load_models(model_args: ModelArguments, train_args: PreferenceDPOConfig):
    """(the policy, the separate reference model or None) in the run's precision."""
    from transformers import AutoModelForCausalLM

    load_kwargs = {"dtype": model_dtype(train_args), "trust_remote_code": train_args.trust_remote_code}
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path, revision=model_args.model_revision, **load_kwargs
    )
    ref_model = None
    if model_args.reference_model_path:
        ref_model = AutoModelForCausalLM.from_pretrained(model_args.reference_model_path, **load_kwargs)
    return model, ref_model


@dataclass
class Callbacks:
    """The trainer's callbacks the recipe reads after training."""

    tensorboard: Any
    stopper: Any
    throughput: Any
    samples: Any


def build_trainer(model, ref_model, tokenizer, model_args, train_args, data: Tokenized, checked: Checked):
    """(the trainer, its callbacks): LoRA from the model settings, both views collated, sample generations after
    each evaluation, TensorBoard, throughput, and the signal handler."""
    from trl import get_peft_config

    from . import report
    from .collator import PreferenceViewsCollator
    from .metrics import TensorBoardMetricsCallback, ThroughputCallback
    from .trainer import PreferenceGuidedDPOTrainer

    tensorboard = TensorBoardMetricsCallback(train_args.log_dir)
    stopper = stop_on_signal(train_args)  # as early as before the refactoring: before the sample prompts' encoding
    samples = report.SampleGenerations(
        report.encode_sample_prompts(data.sample_prompts, tokenizer, data.settings),
        tokenizer,
        train_args.sample_max_new_tokens,
        tensorboard,
        checked.prompt_embedding,
    )
    callbacks = Callbacks(tensorboard, stopper, ThroughputCallback(), samples)
    watch = report.CollapseWatch()
    trainer = PreferenceGuidedDPOTrainer(
        model=model,
        ref_model=ref_model,
        args=train_args,
        data_collator=PreferenceViewsCollator(
            pad_token_id=tokenizer.pad_token_id,
            max_length=train_args.max_length,
            num_soft_tokens=checked.num_soft_tokens,
            guided_forward=train_args.guided_forward,
        ),
        train_dataset=data.train_dataset,
        eval_dataset=data.eval_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        # samples first: they run after each evaluation and before the throughput clock restarts; the throughput
        # before the TensorBoard writer: it adds its figures to the logs
        callbacks=[samples, callbacks.throughput, tensorboard, callbacks.stopper, watch],
        prompt_embedding=checked.prompt_embedding,
        reference_weights=data.reference_weights,
    )
    samples.gap = trainer.generated_instruction_gap
    # The policy before training is its reference (LoRA starts at zero), whose log-probs of the training pairs are
    # precomputed: the watch's baseline, on the very pairs it watches. Not with another reference model.
    if "ref_chosen_logps" in trainer.train_dataset.column_names and not model_args.reference_model_path:
        chosen = trainer.train_dataset["ref_chosen_logps"]
        watch.before = sum(chosen) / len(chosen)
    report.use_one_progress_bar(trainer)
    return trainer, callbacks


def log_throughput(trainer, callbacks: Callbacks, train_seconds: float) -> None:
    if trainer.is_world_process_zero():
        summary = callbacks.throughput.summary(trainer.args, trainer.state, train_seconds)
        generation = getattr(trainer, "generation_seconds", 0.0)  # ALIGN_LOSS=onpolicy_distill
        if generation:
            summary += f"; of which on-policy generation {generation:.0f} s ({generation / train_seconds:.0%})"
        logger.info("Training: %s", summary)


def log_report(trainer, callbacks: Callbacks, trained: Trained, seconds: dict[str, float]) -> None:
    """The final report (rank 0): the held-out metrics before and after, the samples, where the time went."""
    from . import report

    timing = {
        "wall": seconds["wall"],
        "setup (tokenizing, loading, reference pass)": seconds["setup"],
        "training with its evaluations": trained.train_seconds,
    }
    if trained.evaluation_seconds is not None:
        timing["final evaluation"] = trained.evaluation_seconds
    if getattr(trainer, "generation_seconds", 0.0):
        timing["of which on-policy generation"] = trainer.generation_seconds
    if callbacks.samples.history:
        timing["of which sample generations"] = callbacks.samples.seconds
    args = trainer.args
    logger.info(
        report.report(
            args.run_name,
            trained.final_metrics,
            trainer.state.log_history,
            callbacks.samples,
            timing,
            trainer.state.global_step,
            args.output_dir,
            report.tensorboard_command(args),
        )  # fmt: skip
    )


def save_outputs(trainer, tokenizer, base_config, data_args, model_args, train_args, final_metrics, n_train) -> None:
    """The user guide's output layout in `output_dir` (adapter, tokenizer, configs, state), and `merged/`.

    Written into a staging folder first and moved into place file by file, `run_config.json` last: a run
    killed while saving has no `run_config.json`, is not taken as finished, and resumes on rerun.
    """
    output_dir = Path(train_args.output_dir)
    staging = output_dir / STAGING_DIR
    trainer.save_model(str(staging))  # adapter (safetensors), tokenizer files, training_args.bin
    if trainer.is_world_process_zero():
        base_config.save_pretrained(staging)  # config.json: the base model's
        trainer.state.save_to_json(str(staging / "trainer_state.json"))
        if train_args.merge_adapter:
            merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
            merged.save_pretrained(staging / "merged")
            tokenizer.save_pretrained(staging / "merged")
        extra = {"train_pairs": n_train, "final_eval_metrics": final_metrics}
        write_run_config(staging / RUN_CONFIG_NAME, data_args, model_args, train_args, extra)
        move_into(staging, output_dir, last=RUN_CONFIG_NAME)
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        shutil.rmtree(output_dir / TEACHER_DIR, ignore_errors=True)  # kept until now for resuming (teacher.py)
