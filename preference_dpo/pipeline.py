"""One training run, end to end: check inputs, load, train, evaluate, save.

Order matters for the user: everything that can be wrong with the inputs (data files, the model's
config, the embedding file, the token limits) is checked before any model weights are loaded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from importlib.metadata import version
from pathlib import Path

from .checkpoints import RUN_CONFIG_NAME, clear_previous_run, move_into
from .config import DataArguments, ModelArguments, PreferenceDPOConfig
from .errors import UserInputError
from .faults import end_if_stopped, starting_checkpoint, stop_on_signal, train
from .teacher import TEACHER_DIR
from .variables import describe

logger = logging.getLogger(__name__)

LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "deepspeed", "tokenizers")
STAGING_DIR = ".final_outputs_incomplete"
TOKENIZED_DIR = ".tokenized"


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


def check_causal_lm(path: str, flag: str, trust_remote_code: bool, revision: str | None = None):
    """The model's config, loaded without weights (a Hub id: from the cache, or downloaded); `UserInputError`
    unless it is a causal LM."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserInputError(f"{describe(flag)} {path!r}: cannot load a model config ({first_line}).") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UserInputError(
            f"{describe(flag)} {path!r}: model type {config.model_type!r} is not a causal language model."
        )
    return config


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
    missing, wrong = [], []
    for name in targets:
        matched = [m for key, m in modules.items() if key == name or key.endswith(f".{name}")]
        if not matched:
            missing.append(repr(name))
        elif not all(isinstance(m, adaptable) for m in matched):
            kinds = sorted({type(m).__name__ for m in matched if not isinstance(m, adaptable)})
            wrong.append(f"{name!r} ({', '.join(kinds)})")
    if missing or wrong:
        found = sorted({key.rsplit(".", 1)[-1] for key, m in modules.items() if key and isinstance(m, adaptable)})
        parts = [f"no module named {', '.join(missing)}"] if missing else []
        parts += [f"not a layer LoRA can adapt: {', '.join(wrong)}"] if wrong else []
        raise UserInputError(
            f"{describe('lora_target_modules')}: {'; '.join(parts)} in {type(model).__name__}. Its layers LoRA can "
            f"adapt: {', '.join(found)} (or all-linear)."
        )


def library_versions() -> dict[str, str]:
    return {name: version(name) for name in LIBRARIES}


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
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import get_peft_config

    from . import report
    from .cache import MODEL_DIGESTS_DIR, DatasetCache, reference_weights_key
    from .collator import PreferenceViewsCollator
    from .data import load_train_and_test
    from .faults import on_main_process
    from .metrics import TensorBoardMetricsCallback, ThroughputCallback
    from .soft_prompt import load_prompt_embedding
    from .trainer import PreferenceGuidedDPOTrainer

    started = time.monotonic()
    remote = train_args.trust_remote_code
    # --- everything checkable without weights ---
    revision = model_args.model_revision
    config = check_causal_lm(model_args.model_name_or_path, "model_name_or_path", remote, revision)
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
    prompt_embedding = None
    if train_args.training_mode == "embedding":
        prompt_embedding = load_prompt_embedding(train_args.prompt_embedding_path, config.get_text_config().hidden_size)
        logger.info("Prompt embedding: %d virtual tokens of size %d", *prompt_embedding.shape)
    num_soft_tokens = 0 if prompt_embedding is None else prompt_embedding.shape[0]

    model_path = model_args.model_name_or_path
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=remote, revision=revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenize_kwargs = {
        "preference_text": train_args.preference_text,
        "preference_position": train_args.preference_position,
        "num_soft_tokens": num_soft_tokens,
        "max_length": train_args.max_length,
        "max_prompt_length": train_args.max_prompt_length,
        "num_proc": train_args.dataset_num_proc,
    }
    train_pairs, test_pairs = load_train_and_test(data_args)
    cache = DatasetCache(Path(train_args.cache_dir), train_args.cache, Path(train_args.output_dir) / TOKENIZED_DIR)
    stamps = Path(train_args.cache_dir) / MODEL_DIGESTS_DIR if train_args.cache else None
    reference_weights = on_main_process(
        lambda: reference_weights_key(
            model_path, model_args.reference_model_path, (train_args.bf16, train_args.fp16), stamps, revision
        ),
        train_args,
    )  # what the precomputed reference values are keyed on (with the tokens and the settings that change them)
    views = (data_args, tokenizer, tokenize_kwargs, train_args, cache)
    train_dataset, _ = tokenized_views("train", data_args.train_dataset_path, train_pairs, *views)
    eval_dataset, test_meta = None, {}
    if test_pairs is not None:
        eval_dataset, test_meta = tokenized_views("test", data_args.test_dataset_path, test_pairs, *views)
    elif train_args.eval_strategy != "no":
        logger.info("No test set: evaluation is off.")
        train_args.eval_strategy = "no"
    if eval_dataset is None or train_args.eval_strategy == "no":  # no evaluation during training: none before it
        train_args.eval_on_start = False
    if train_args.process_index == 0:
        logger.info(
            report.summary(
                data_args, model_args, train_args, len(train_dataset), len(eval_dataset or []), num_soft_tokens
            )
        )
    resume_from = starting_checkpoint(train_args, lambda: clear_previous_run(train_args.output_dir, train_args.log_dir))

    # --- weights ---
    dtype = torch.bfloat16 if train_args.bf16 else torch.float16 if train_args.fp16 else torch.float32
    load_kwargs = {"dtype": dtype, "trust_remote_code": remote}
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, revision=revision, **load_kwargs)
    ref_model = None
    if model_args.reference_model_path:
        ref_model = AutoModelForCausalLM.from_pretrained(model_args.reference_model_path, **load_kwargs)

    tensorboard = TensorBoardMetricsCallback(train_args.log_dir)
    stopper = stop_on_signal(train_args)
    throughput = ThroughputCallback()  # before the TensorBoard writer: it adds its figures to the logs
    sample_prompts = test_meta.get("sample_prompts", [])[: train_args.num_sample_prompts]
    samples = report.SampleGenerations(
        report.encode_sample_prompts(sample_prompts, tokenizer, tokenize_kwargs),
        tokenizer,
        train_args.sample_max_new_tokens,
        tensorboard,
        prompt_embedding,
    )
    trainer = PreferenceGuidedDPOTrainer(
        model=model,
        ref_model=ref_model,
        args=train_args,
        data_collator=PreferenceViewsCollator(
            pad_token_id=tokenizer.pad_token_id,
            max_length=train_args.max_length,
            num_soft_tokens=num_soft_tokens,
            guided_forward=train_args.guided_forward,
        ),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        # samples first: they run after each evaluation and before the throughput clock restarts
        callbacks=[samples, throughput, tensorboard, stopper],
        prompt_embedding=prompt_embedding,
        reference_weights=reference_weights,
    )
    report.use_one_progress_bar(trainer)
    train_started = time.monotonic()
    timing = {"setup (tokenizing, loading, reference pass)": train_started - started}
    train(trainer, stopper, resume_from)
    timing["training with its evaluations"] = time.monotonic() - train_started
    if trainer.is_world_process_zero():
        logger.info("Training: %s", throughput.summary(train_args, trainer.state, time.monotonic() - train_started))
    end_if_stopped(trainer, stopper, train_args.output_dir, before_stop=tensorboard.close)
    final_metrics: dict[str, float] = {}
    if eval_dataset is not None:
        evaluation_started = time.monotonic()
        final_metrics, evaluated = final_evaluation(trainer)
        if evaluated:
            timing["final evaluation"] = time.monotonic() - evaluation_started
    tensorboard.close()

    save_outputs(trainer, tokenizer, config, data_args, model_args, train_args, final_metrics, len(train_dataset))
    if trainer.is_world_process_zero():
        cache.remove_fallback()  # the per-run copy of the tokenized pairs (cache off); every rank is done with it
        if samples.history:
            timing["of which sample generations"] = samples.seconds
        timing = {"wall": time.monotonic() - started, **timing}
        logger.info(
            report.report(
                train_args.run_name,
                final_metrics,
                trainer.state.log_history,
                samples,
                timing,
                trainer.state.global_step,
                train_args.output_dir,
                report.tensorboard_command(train_args),
            )
        )
    return final_metrics


def final_evaluation(trainer) -> tuple[dict[str, float], bool]:
    """(the trained weights' evaluation metrics, whether it ran now): the Trainer's own evaluation at the last step
    when there was one (every eval strategy evaluates at the end of training), the same weights; else one now."""
    last = next((e for e in reversed(trainer.state.log_history) if "eval_loss" in e), {})
    if last.get("step") == trainer.state.global_step:
        return {k: v for k, v in last.items() if k.startswith("eval_")}, False
    return trainer.evaluate(), True


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
