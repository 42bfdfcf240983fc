"""Typed configuration: TRL's `DPOConfig` and `ModelConfig` extended with this method's fields.

Everything is parsed once, by `parse_args`, and validated by `validate`, which reports every problem
at once and names the launcher variable (`ALPHA`) and the flag (`--aligned_loss_weight`) to change.
Defaults here equal the defaults of `fast_train.sh` (a test checks it): with none given, the embedded
tiny model trains on the embedded data set.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from trl import DPOConfig, ModelConfig

from .errors import UserInputError
from .forms import DEFAULT_FORM, FORM_DEFAULTS, FORMS
from .presets import PRESETS, is_preset, resolve
from .variables import describe

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RUN_NAME = "Preference_Guided_DPO"
DEFAULT_PREFERENCE_TEXT = "Please provide a helpful, honest, harmless and concise answer."
TRAINING_MODES = ("text", "embedding")
PREFERENCE_POSITIONS = ("system", "user")
ALIGN_LOSSES = tuple(FORMS)
DISTILL_REDUCTIONS = ("token_mean", "sequence_sum")
GUIDED_FORWARDS = ("shared_prompt", "full")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
STAGES = ("dpo", "ptune")  # the launcher's STAGE=all runs ptune, then dpo
PTUNE_OBJECTIVES = ("dpo", "sft")
PTUNE_INITS = ("text", "vocab")
PTUNE_ENCODERS = ("none", "mlp")


@dataclass
class DataArguments:
    """Where the preference pairs come from."""

    train_dataset_path: str = field(
        default=str(REPO_ROOT / "data" / "preference_pairs" / "train.jsonl"),
        metadata={"help": "Training pairs: a .jsonl, .json or .parquet file, or a `save_to_disk` folder."},
    )
    test_dataset_path: str | None = field(
        default=str(REPO_ROOT / "data" / "preference_pairs" / "test.jsonl"),
        metadata={"help": "Held-out pairs for evaluation, same formats; empty for none."},
    )
    dataset_split: str = field(
        default="train",
        metadata={
            "help": "The split a folder gives, named as `datasets` names splits: `train`, or e.g. `train_prefs`. A "
            "test folder gives the matching test split (`test`, `test_prefs`)."
        },
    )


@dataclass
class ModelArguments(ModelConfig):
    """TRL's `ModelConfig` (model path, LoRA) plus the reference model. LoRA is on by default."""

    model_name_or_path: str | None = field(
        default=str(REPO_ROOT / "tiny_model"),
        metadata={
            "help": "Policy model: a local folder, a Hub id, or a short name the tool builds a folder for once ("
            + ", ".join(PRESETS)
            + "; see preference_dpo/presets.py). The embedded default is built in `tiny_model`."
        },
    )
    lora_target_modules: list[str] | None = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "Modules that get LoRA: names, or `all-linear` (every linear layer but the LM head)."},
    )
    use_peft: bool = field(default=True, metadata={"help": "Train a LoRA adapter (the reference is the adapter off)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout."})
    reference_model_path: str | None = field(
        default=None,
        metadata={
            "help": "A different reference model, loaded frozen. Empty: the policy with the LoRA adapter disabled, "
            "which needs no second copy in memory."
        },
    )

    def __post_init__(self):
        super().__post_init__()  # TRL turns a one-element list into a plain string
        # The launcher passes LORA_TARGET_MODULES as one argument ("q_proj,v_proj" or "q_proj v_proj"). PEFT reads a
        # string as a regex over the full module path ("q_proj" alone matches nothing) and a list as module names,
        # so names stay a list, and only `all-linear`, PEFT's keyword, stays a string.
        parts = self.lora_target_modules
        if parts is not None:
            parts = [parts] if isinstance(parts, str) else parts
            names = [name for part in parts for name in re.split(r"[,\s]+", part) if name]
            self.lora_target_modules = "all-linear" if names == ["all-linear"] else names


@dataclass
class PreferenceDPOConfig(DPOConfig):
    """TRL's `DPOConfig` plus the preference instruction, the aligned loss and the output layout.

    `beta`, `loss_type`, `max_length` and every other DPO and training field are TRL's own.
    """

    # Our fields
    training_mode: str = field(
        default="text",
        metadata={"help": "How the preference instruction is given.", "choices": list(TRAINING_MODES)},
    )
    preference_text: str = field(
        default=DEFAULT_PREFERENCE_TEXT, metadata={"help": "The instruction text (text mode)."}
    )
    preference_position: str = field(
        default="system",
        metadata={
            "help": "Where the instruction goes in a conversational prompt: `system` (appended to the system "
            "message, or a new one first) or `user` (before the first user message). Plain-string prompts always "
            "get it first, followed by a blank line.",
            "choices": list(PREFERENCE_POSITIONS),
        },
    )
    prompt_embedding_path: str | None = field(
        default=None,
        metadata={"help": "Soft-prompt tensor [k, hidden] or [hidden] (embedding mode): .pt/.bin or .safetensors."},
    )
    aligned_loss_weight: float | None = field(
        default=None,
        metadata={
            "help": "ALPHA: weight of the aligned loss; 0 is plain DPO (the guided view is then skipped). Empty: the "
            "form's own scale, 1 for ref_distill, distill, onpolicy_distill and context_distill, 0.1 for hinge and "
            "ref_hinge."
        },
    )
    align_loss: str = field(
        default=DEFAULT_FORM,
        metadata={
            "help": "Form of the aligned loss. `ref_distill`: the KL from the frozen reference with the instruction "
            "to the policy without it; `hinge` (the original method): relu(stopgrad(h_pref) - h_base).",
            "choices": list(ALIGN_LOSSES),
        },
    )
    distill_top_k: int | None = field(
        default=None,
        metadata={
            "help": "ALIGN_LOSS=ref_distill: keep the reference teacher's K most likely next tokens at every response "
            "position, plus one bucket for the rest of the mass, computed once before training (no teacher forward "
            "in the training steps). Empty: 16. 0: the exact KL over the vocabulary, with a reference forward every "
            "step."
        },
    )
    distill_reduction: str | None = field(
        default=None,
        metadata={
            "help": "ALIGN_LOSS=distill or ref_distill: `token_mean` averages the KL over every response position of "
            "the optimizer step (all accumulation steps and ranks); `sequence_sum` sums it over each response, then "
            "averages over responses (DPO's scale). Empty: sequence_sum for ref_distill, token_mean otherwise.",
            "choices": list(DISTILL_REDUCTIONS),
        },
    )
    guided_forward: str = field(
        default="shared_prompt",
        metadata={
            "help": "How the guided view is scored: `shared_prompt` runs each guided prompt once and both responses "
            "on its KV cache; `full` runs prompt+response twice (the reference the first is tested against).",
            "choices": list(GUIDED_FORWARDS),
        },
    )
    max_prompt_length: int = field(
        default=128,
        metadata={
            "help": "Pairs whose prompt, with the instruction in it, has more tokens than this are dropped "
            "(and counted in the log)."
        },
    )
    precision: str = field(
        default="auto",
        metadata={"help": "`auto`: bf16 on GPUs that support it, fp32 otherwise.", "choices": list(PRECISIONS)},
    )
    log_dir: str | None = field(default=None, metadata={"help": "TensorBoard folder. Default: logs/<run_name>."})
    merge_adapter: bool = field(
        default=False, metadata={"help": "Also write the base model with the adapter merged, to <output_dir>/merged."}
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "Replace a finished run in output_dir (its checkpoints too). Off: such a run is an error."},
    )
    skip_nonfinite_batches: bool = field(
        default=False,
        metadata={
            "help": "On a NaN/Inf loss, skip the batch (counted as `nonfinite_batches_skipped`) instead of stopping "
            "with an error."
        },
    )
    # ALIGN_LOSS=onpolicy_distill (preference_dpo/forms/onpolicy.py)
    distill_on_policy_frac: float = field(
        default=1.0,
        metadata={
            "help": "ALIGN_LOSS=onpolicy_distill: the share of optimizer steps that generate the policy's own "
            "answers (evenly spread); the other steps distil on the pairs' responses, as GKD's lmbda."
        },
    )
    on_policy_temperature: float = field(
        default=1.0, metadata={"help": "ALIGN_LOSS=onpolicy_distill: sampling temperature of the policy's answers."}
    )
    on_policy_max_new_tokens: int | None = field(
        default=None,
        metadata={
            "help": "ALIGN_LOSS=onpolicy_distill and context_distill: the longest answer, in tokens. Default: the "
            "longest chosen response of the training pairs."
        },
    )
    on_policy_divergence: str = field(
        default="reverse_kl",
        metadata={
            "help": "ALIGN_LOSS=onpolicy_distill: `reverse_kl` KL(policy || reference), or `jsd`, GKD's "
            "generalised Jensen-Shannon divergence with --on_policy_jsd_beta.",
            "choices": ["reverse_kl", "jsd"],
        },
    )
    on_policy_jsd_beta: float = field(
        default=0.5, metadata={"help": "--on_policy_divergence jsd: the mixture weight of the reference, in (0, 1)."}
    )
    # The stage that learns the soft prompt (preference_dpo/ptune.py)
    stage: str = field(
        default="dpo",
        metadata={
            "help": "`dpo`: preference-guided DPO; `ptune`: learn the soft prompt that embedding mode reads, and stop. "
            "The launcher's STAGE=all runs ptune, then dpo in embedding mode with the prompt just learned.",
            "choices": list(STAGES),
        },
    )
    num_virtual_tokens: int = field(default=16, metadata={"help": "Soft-prompt length k (ptune stage)."})
    ptune_objective: str = field(
        default="dpo",
        metadata={
            "help": "`dpo`: the prompted frozen model is the policy, the same model without the prompt the reference "
            "(BETA as in DPO); `sft`: likelihood of the chosen responses.",
            "choices": list(PTUNE_OBJECTIVES),
        },
    )
    ptune_init: str = field(
        default="text",
        metadata={
            "help": "`text`: the token embeddings of PREFERENCE_TEXT, repeated or cut to k; `vocab`: k random rows "
            "of the vocabulary's embeddings.",
            "choices": list(PTUNE_INITS),
        },
    )
    ptune_encoder: str = field(
        default="none",
        metadata={
            "help": "`none`: the k vectors are trained directly (prompt tuning); `mlp`: through PEFT's PromptEncoder, "
            "an MLP over them (P-tuning). The saved file holds the vectors either way.",
            "choices": list(PTUNE_ENCODERS),
        },
    )
    ptune_learning_rate: float = field(default=1e-2, metadata={"help": "AdamW learning rate of the soft prompt."})
    ptune_epochs: float = field(default=1.0, metadata={"help": "Epochs of the ptune stage."})
    ptune_max_steps: int = field(
        default=-1, metadata={"help": "Optimizer steps of the ptune stage; > 0 overrides ptune_epochs."}
    )
    ptune_output_dir: str | None = field(
        default=None, metadata={"help": "Where the learned prompt goes. Default: <output_dir>/ptune."}
    )
    cache: bool = field(
        default=True,
        metadata={
            "help": "Reuse the tokenized views, the reference log-probs and the top-K teacher of an earlier run with the "
            "same data, model, tokenizer and instruction (`--no_cache` or `--cache false`: recompute, keep nothing)."
        },
    )
    cache_dir: str = field(
        default=str(REPO_ROOT / ".cache" / "preference_dpo"),
        metadata={"help": "Where the cache lives (safe to delete; several runs and ranks may share it)."},
    )
    num_sample_prompts: int = field(
        default=3,
        metadata={
            "help": "Held-out prompts generated from greedily, without and with the instruction, before training "
            "and at each evaluation (TensorBoard text and the final report); 0 turns it off."
        },
    )
    sample_max_new_tokens: int = field(default=48, metadata={"help": "Longest sample generation, in tokens."})
    log_file: str | None = field(
        default=None,
        metadata={"help": "A file that also gets the full settings and every sample (the launcher passes its log)."},
    )

    # TRL / transformers fields whose defaults differ for this tool (as TRL itself overrides learning_rate)
    output_dir: str | None = field(default=None, metadata={"help": "Default: model_output/<run_name>."})
    run_name: str | None = field(default=DEFAULT_RUN_NAME, metadata={"help": "Names the run and its default folders."})
    beta: float = field(default=0.05, metadata={"help": "DPO temperature (0.01-0.5; smaller is more conservative)."})
    learning_rate: float = field(default=5e-4, metadata={"help": "AdamW learning rate."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Pairs per device per micro-step."})
    per_device_eval_batch_size: int = field(default=16, metadata={"help": "Pairs per device per eval step."})
    max_length: int | None = field(
        default=300, metadata={"help": "Longest sequence (prompt with instruction + response) in tokens."}
    )
    precompute_ref_log_probs: bool = field(
        default=True, metadata={"help": "Compute the reference log-probs once before training."}
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Trade compute for memory."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N optimizer steps."})
    eval_strategy: str = field(default="steps", metadata={"help": "`steps`, `epoch` or `no` (no test set: `no`)."})
    eval_steps: float | None = field(default=50, metadata={"help": "Evaluate every N steps."})
    save_steps: float = field(default=200, metadata={"help": "Checkpoint every N steps."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept."})
    resume_from_checkpoint: str | None = field(
        default="true",
        metadata={
            "help": "`true`: continue from the newest complete checkpoint in output_dir, if any; `false`: start "
            "afresh; a path: that checkpoint."
        },
    )
    warmup_steps: float = field(default=0.1, metadata={"help": "Warm-up steps (a float < 1 is a fraction)."})
    eval_on_start: bool = field(
        default=True,
        metadata={"help": "Evaluate once before training, so the report and TensorBoard show before and after."},
    )

    def __post_init__(self):
        import torch

        self._apply_form_defaults()
        if self.output_dir is None:
            self.output_dir = os.path.join("model_output", self.run_name or DEFAULT_RUN_NAME)
        if self.ptune_output_dir is None:
            self.ptune_output_dir = os.path.join(self.output_dir, "ptune")
        if self.log_dir is None:
            self.log_dir = os.path.join("logs", self.run_name or DEFAULT_RUN_NAME)
        # an unknown value, or bf16 on a device without it, is reported by `validate`
        if self.precision in PRECISIONS and _precision_problem(self.precision, self.use_cpu) is None:
            self.bf16, self.fp16 = _resolve_precision(self.precision)
            if self.bf16 and not self.use_cpu:
                # transformers refuses bf16 without a GPU unless told that the run is on CPU, which it then is
                # anyway; torch runs bf16 (autocast and bf16 weights) on CPU.
                self.use_cpu = not torch.accelerator.is_available()
        if not torch.accelerator.is_available():
            # Pinned memory is for copies to an accelerator: without one it does nothing, and torch warns about it
            # for every DataLoader (transformers turns it off for use_cpu only).
            self.dataloader_pin_memory = False
        super().__post_init__()

    def _apply_form_defaults(self) -> None:
        """Fill the settings left empty with the form's own (`forms.FORM_DEFAULTS`). A value that was set stays,
        so `validate` can still refuse one that does not apply to the form (DISTILL_TOP_K with hinge)."""
        defaults = FORM_DEFAULTS.get(self.align_loss)
        if defaults is None:  # an unknown form, reported by `validate`
            defaults = {"alpha": 0.0, "top_k": None, "reduction": "token_mean"}
        if self.aligned_loss_weight is None:
            self.aligned_loss_weight = defaults["alpha"]
        if self.distill_top_k is None:
            self.distill_top_k = defaults["top_k"]
        if self.distill_reduction is None:
            self.distill_reduction = defaults["reduction"]


def _resolve_precision(precision: str) -> tuple[bool, bool]:
    """(bf16, fp16) for a precision name; `auto` is bf16 where the GPU supports it, else fp32."""
    if precision == "auto":
        import torch

        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()), False
    return precision == "bf16", precision == "fp16"


def _precision_problem(precision: str, use_cpu: bool) -> str | None:
    """Why `precision` cannot run on this machine, or None. bf16 runs on CPU and on GPUs that support it."""
    if precision != "bf16" or use_cpu:
        return None
    import torch
    from transformers.utils import is_torch_bf16_gpu_available

    if torch.accelerator.is_available() and not is_torch_bf16_gpu_available():
        device = torch.accelerator.current_accelerator().type
        return f"{describe('precision')}=bf16: this {device} device does not support bf16; use fp16 or fp32 (or auto)."
    return None


def _model_problem(flag: str, path: str, revision: str | None) -> str | None:
    """Why `path` is neither a model folder nor a Hub model id that transformers can load here, or None.

    As in transformers: an existing folder is local; anything else shaped like a Hub id (`org/name` or `name`) is
    one, read from the local Hub cache or downloaded. Offline (HF_HUB_OFFLINE=1), it must be in the cache.
    """
    if os.path.isdir(path):
        return None
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    # the embedded default's folder is built by the launcher: the hint only for a path that names it
    embedded = flag == "model_name_or_path" and Path(path).name == "tiny_model"
    hint = " Run ./fast_train.sh once to build the embedded default." if embedded else ""
    if os.path.exists(path):
        return f"{describe(flag)}: {path!r} is a file; give the model's folder.{hint}"
    try:
        validate_repo_id(path)
    except HFValidationError:
        return f"{describe(flag)}: no such model folder {path!r}.{hint}"
    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(path, "config.json", revision=revision), str):
        return (
            f"{describe(flag)}: {path!r} is neither a model folder nor a Hub model in the local cache "
            f"({constants.HF_HUB_CACHE}), and HF_HUB_OFFLINE=1 forbids downloading it: give a model folder, or "
            f"download the model first (`hf download {path}`, without HF_HUB_OFFLINE).{hint}"
        )
    return None  # online: transformers downloads it, and `stage.check_causal_lm` reports a failure in one line


def _check_choice(problems: list[str], flag: str, value, choices) -> None:
    if value not in choices:
        problems.append(f"{describe(flag)} must be one of {', '.join(choices)}; got {value!r}.")


def validate(data: DataArguments, model: ModelArguments, train: PreferenceDPOConfig) -> None:
    """Raise `UserInputError` listing every problem; warn about legal but unusual values."""
    problems: list[str] = []
    _check_choice(problems, "training_mode", train.training_mode, TRAINING_MODES)
    _check_choice(problems, "preference_position", train.preference_position, PREFERENCE_POSITIONS)
    _check_choice(problems, "align_loss", train.align_loss, ALIGN_LOSSES)
    _check_choice(problems, "precision", train.precision, PRECISIONS)
    _check_choice(problems, "guided_forward", train.guided_forward, GUIDED_FORWARDS)
    _check_choice(problems, "distill_reduction", train.distill_reduction, DISTILL_REDUCTIONS)
    _check_choice(problems, "stage", train.stage, STAGES)
    if train.stage == "ptune":
        problems += _ptune_problems(train)
    precision_problem = _precision_problem(train.precision, train.use_cpu)
    if precision_problem:
        problems.append(precision_problem)
    if train.training_mode == "text" and not train.preference_text.strip():
        problems.append(f"{describe('preference_text')} is empty: text mode needs the instruction text.")
    if train.training_mode == "embedding" and train.stage != "ptune":  # ptune writes the file, never reads it
        if not train.prompt_embedding_path:
            problems.append(f"{describe('prompt_embedding_path')} is required in embedding mode: give the .pt file.")
        elif not os.path.isfile(train.prompt_embedding_path):
            problems.append(f"{describe('prompt_embedding_path')}: no such file {train.prompt_embedding_path!r}.")

    def positive(flag: str, value, strict: bool = True, hint: str = "") -> None:
        if strict and not value > 0 or not strict and not value >= 0:
            bound = "> 0" if strict else ">= 0"
            problems.append(f"{describe(flag)} must be {bound}; got {value}.{hint}")

    positive("beta", train.beta, hint=" Typical: 0.01-0.5.")
    positive("aligned_loss_weight", train.aligned_loss_weight, strict=False, hint=" Use 0 for plain DPO.")
    positive("learning_rate", train.learning_rate, hint=" Typical: 1e-5 to 1e-3.")
    positive("per_device_train_batch_size", train.per_device_train_batch_size)
    from .report import MAX_SAMPLE_PROMPTS

    if not 0 <= train.num_sample_prompts <= MAX_SAMPLE_PROMPTS:
        problems.append(
            f"{describe('num_sample_prompts')} must be between 0 and {MAX_SAMPLE_PROMPTS}; got {train.num_sample_prompts}."
        )
    positive("sample_max_new_tokens", train.sample_max_new_tokens)
    if train.gradient_accumulation_steps < 1:
        problems.append(
            f"{describe('gradient_accumulation_steps')} must be >= 1; got {train.gradient_accumulation_steps}."
        )
    if train.max_steps <= 0 and not train.num_train_epochs > 0:
        problems.append(f"{describe('num_train_epochs')} must be > 0 (or set {describe('max_steps')}).")
    if model.use_peft:
        if model.lora_r < 1:
            problems.append(f"{describe('lora_r')} must be >= 1; got {model.lora_r}. Typical: 8, 16, 32, 64.")
        positive("lora_alpha", model.lora_alpha, hint=" Usually 2 * LORA_R.")
        if not 0 <= model.lora_dropout < 1:
            problems.append(f"{describe('lora_dropout')} must be in [0, 1); got {model.lora_dropout}.")
        targets = model.lora_target_modules
        if not targets or (isinstance(targets, list) and "all-linear" in targets):
            problems.append(
                f"{describe('lora_target_modules')} must be module names (comma- or space-separated, e.g. "
                f"q_proj,v_proj) or all-linear; got {targets!r}."
            )
    if train.max_length is None or train.max_length < 2:
        problems.append(f"{describe('max_length')} must be >= 2; got {train.max_length}.")
    elif not 1 <= train.max_prompt_length < train.max_length:
        problems.append(
            f"{describe('max_prompt_length')} must be >= 1 and < {describe('max_length')}; got "
            f"{train.max_prompt_length} and {train.max_length}."
        )
    zero_stage = _zero_stage(train.deepspeed)
    if train.merge_adapter and zero_stage == 3:
        problems.append(
            f"{describe('merge_adapter')} is not supported with ZeRO-3 (ZERO_STAGE=3): the weights are sharded. "
            "Merge afterwards with PeftModel.merge_and_unload()."
        )
    if train.align_loss == "distill" and zero_stage == 3:
        problems.append(f"{describe('align_loss')}=distill is not supported with ZeRO-3 (ZERO_STAGE=3) yet.")
    if train.align_loss == "distill" and train.guided_forward != "shared_prompt":
        problems.append(f"{describe('align_loss')}=distill needs --guided_forward shared_prompt.")
    problems += _distill_problems(model, train, zero_stage)
    problems += _on_policy_problems(model, train, zero_stage)
    if train.ld_alpha is not None:
        problems.append("--ld_alpha is not supported: the aligned loss compares plain summed log-probs.")
    if not data.train_dataset_path:
        problems.append(f"{describe('train_dataset_path')} is empty: give the training data file.")
    elif not os.path.exists(data.train_dataset_path):
        problems.append(f"{describe('train_dataset_path')}: no such file or folder {data.train_dataset_path!r}.")
    if not data.dataset_split:
        problems.append(f"{describe('dataset_split')} is empty: give a split name such as train.")
    if data.test_dataset_path and not os.path.exists(data.test_dataset_path):
        problems.append(
            f"{describe('test_dataset_path')}: no such file or folder {data.test_dataset_path!r} "
            "(leave it empty for no evaluation)."
        )
    for flag, path, revision in (
        ("model_name_or_path", model.model_name_or_path, model.model_revision),
        ("reference_model_path", model.reference_model_path, None),
    ):
        problem = _model_problem(flag, path, revision) if path and not is_preset(path) else None
        if problem:
            problems.append(problem)
    if train.output_dir and train.stage != "ptune":  # the ptune stage writes to ptune_output_dir only
        from .checkpoints import check_output_dir

        problems += check_output_dir(train.output_dir, train.overwrite)
    if problems:
        raise UserInputError(problems)

    for flag, value, low, high in (
        ("beta", train.beta, 0.01, 0.5),
        ("learning_rate", train.learning_rate, 1e-5, 1e-3),
    ):
        if not low <= value <= high:
            logger.warning("%s = %g is outside the usual range %g-%g.", describe(flag), value, low, high)
    # Each form's ALPHA has its own scale (forms.FORM_DEFAULTS): warn from 5 times the form's own. (The form is
    # known here: an unknown one was refused above.)
    if train.aligned_loss_weight > 5 * FORM_DEFAULTS[train.align_loss]["alpha"]:
        logger.warning(
            "%s = %g is large: %s",
            describe("aligned_loss_weight"),
            train.aligned_loss_weight,
            _LARGE_ALPHA.get(train.align_loss, _LARGE_ALPHA_OTHER),
        )


def _distill_problems(model: ModelArguments, train: PreferenceDPOConfig, zero_stage: int | None) -> list[str]:
    """Problems with ALIGN_LOSS=ref_distill and the distillation options."""
    problems = []
    form = f"{describe('align_loss')}=ref_distill"
    if train.align_loss == "ref_distill":
        if zero_stage == 3:
            problems.append(
                f"{form} (the default) is not supported with ZeRO-3 (ZERO_STAGE=3) yet: use ZERO_STAGE=2, or "
                f"{describe('align_loss')}=ref_hinge or hinge with ZeRO-3."
            )
        if train.guided_forward != "shared_prompt":
            problems.append(f"{form} needs --guided_forward shared_prompt.")
        if not train.distill_top_k and not model.use_peft and not model.reference_model_path:
            problems.append(
                f"{form} without LoRA has no frozen reference to run in every step: set "
                f"{describe('reference_model_path')} or --distill_top_k (the teacher precomputed before training)."
            )
    if train.distill_top_k is not None:
        if train.align_loss != "ref_distill":
            problems.append(
                f"--distill_top_k needs a fixed teacher, {form}; with {describe('align_loss')}={train.align_loss} "
                "leave it empty."
            )
        if train.distill_top_k < 0:
            problems.append(
                f"{describe('distill_top_k')} must be >= 1, or 0 for the exact KL; got {train.distill_top_k}. "
                "Typical: 16 to 64."
            )
    if train.distill_reduction != "token_mean" and train.align_loss not in ("distill", "ref_distill"):
        problems.append(
            f"--distill_reduction applies to {describe('align_loss')}=distill or ref_distill; with "
            f"{train.align_loss} leave it at token_mean."
        )
    return problems


def _on_policy_problems(model: ModelArguments, train: PreferenceDPOConfig, zero_stage: int | None) -> list[str]:
    """Problems with ALIGN_LOSS=onpolicy_distill and its options."""
    problems: list[str] = []
    _check_choice(problems, "on_policy_divergence", train.on_policy_divergence, ("reverse_kl", "jsd"))
    if not 0.0 < train.distill_on_policy_frac <= 1.0:
        problems.append(
            f"{describe('distill_on_policy_frac')} must be in (0, 1]; got {train.distill_on_policy_frac:g}."
        )
    if train.on_policy_temperature <= 0:
        problems.append(f"--on_policy_temperature must be > 0; got {train.on_policy_temperature:g}. Typical: 0.7 to 1.")
    if train.on_policy_max_new_tokens is not None and train.on_policy_max_new_tokens < 1:
        problems.append(f"--on_policy_max_new_tokens must be >= 1; got {train.on_policy_max_new_tokens}.")
    if train.on_policy_divergence == "jsd" and not 0.0 < train.on_policy_jsd_beta < 1.0:
        problems.append(f"--on_policy_jsd_beta must be in (0, 1); got {train.on_policy_jsd_beta:g}.")
    if train.align_loss in ("onpolicy_distill", "context_distill"):
        form = f"{describe('align_loss')}={train.align_loss}"
        if zero_stage == 3:  # the reference's passes with hidden states, as exact ref_distill's
            problems.append(f"{form} is not supported with ZeRO-3 (ZERO_STAGE=3) yet.")
        if train.guided_forward != "shared_prompt":  # the answers are generated after the guided prompts' layout
            problems.append(f"{form} needs --guided_forward shared_prompt.")
        if not model.use_peft and not model.reference_model_path:
            problems.append(
                f"{form} without LoRA has no frozen reference to score the answers: set "
                f"{describe('reference_model_path')}."
            )
    return problems


def _ptune_problems(train: PreferenceDPOConfig) -> list[str]:
    """Problems with the settings of the stage that learns the soft prompt (STAGE=ptune)."""
    problems: list[str] = []
    for flag, value, choices in (
        ("ptune_objective", train.ptune_objective, PTUNE_OBJECTIVES),
        ("ptune_init", train.ptune_init, PTUNE_INITS),
        ("ptune_encoder", train.ptune_encoder, PTUNE_ENCODERS),
    ):
        _check_choice(problems, flag, value, choices)
    if train.num_virtual_tokens < 1:
        problems.append(
            f"{describe('num_virtual_tokens')} must be >= 1; got {train.num_virtual_tokens}. Typical: 8-32."
        )
    elif train.num_virtual_tokens >= train.max_prompt_length:
        problems.append(
            f"{describe('num_virtual_tokens')} = {train.num_virtual_tokens} leaves no room for a prompt within "
            f"{describe('max_prompt_length')} = {train.max_prompt_length}; use fewer tokens or raise MAX_PROMPT_LENGTH."
        )
    if not train.ptune_learning_rate > 0:
        problems.append(
            f"{describe('ptune_learning_rate')} must be > 0; got {train.ptune_learning_rate}. Typical: 1e-2."
        )
    if train.ptune_max_steps <= 0 and not train.ptune_epochs > 0:
        problems.append(f"{describe('ptune_epochs')} must be > 0 (or set {describe('ptune_max_steps')}).")
    if train.ptune_init == "text" and not train.preference_text.strip():
        problems.append(
            f"{describe('preference_text')} is empty: {describe('ptune_init')}=text starts the prompt from its tokens "
            "(or use PTUNE_INIT=vocab)."
        )
    if not train.ptune_output_dir:
        problems.append(f"{describe('ptune_output_dir')} is empty: give the folder for the learned prompt.")
    return problems


# What a large ALPHA risks, per form (docs/method.md, "Known behaviour of the aligned loss")
_LARGE_ALPHA = {
    "hinge": "the hinge's target moves with the policy, so it never saturates and margins can grow without "
    "bound (docs/method.md). Watch aligned_active_frac and logps_train/chosen.",
    "ref_hinge": "every pair below the reference's instructed margin gets ALPHA added to its DPO weight, much "
    "like a larger learning rate on those pairs (docs/method.md). Watch logps_train/chosen.",
    "distill": "the KL term can outweigh DPO and pull the un-instructed model onto the instructed one token by "
    "token, and training can go unstable (docs/method.md). Watch logps_train/chosen.",
    "onpolicy_distill": "the divergence is summed over each answer, the scale of DPO's summed log-probs: ALPHA 1 "
    "is its usual weight (docs/method.md). Watch logps_train/chosen.",
    "context_distill": "the KL is summed over each answer, the scale of DPO's summed log-probs: ALPHA 1 is its "
    "usual weight (docs/method.md). Watch logps_train/chosen.",
}
_LARGE_ALPHA_OTHER = "the aligned term can outweigh DPO (docs/method.md). Watch logps_train/chosen."


def _zero_stage(deepspeed) -> int | None:
    """The ZeRO stage of a DeepSpeed config given as a dict or a JSON file path (None without one)."""
    if not deepspeed:
        return None
    import json

    config = deepspeed if isinstance(deepspeed, dict) else json.loads(Path(deepspeed).read_text())
    return config.get("zero_optimization", {}).get("stage")


def _configure_cpu_deepspeed(argv: list[str]) -> list[str]:
    """DeepSpeed ranks on CPU: set up accelerate's distributed state with gloo before the config is built.

    Left to itself, accelerate initialises DeepSpeed's process group on CPU but keeps no backend, counts
    one process, and transformers then sizes DeepSpeed's batch for one rank (TRL's reference precompute
    fails DeepSpeed's batch check). A state configured here, with gloo, is the one the trainer uses.
    """
    import torch

    if os.environ.get("LOCAL_RANK") is None or torch.cuda.is_available() or "--deepspeed" not in argv:
        return argv
    from accelerate.state import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    return [*argv, "--accelerator_config", '{"use_configured_state": true}']


def parse_args(argv: list[str] | None = None) -> tuple[DataArguments, ModelArguments, PreferenceDPOConfig]:
    """Parse the command line once into the three typed configs and validate them."""
    import sys

    from trl import TrlParser

    argv = _configure_cpu_deepspeed(list(sys.argv[1:] if argv is None else argv))

    class Parser(TrlParser):
        def error(self, message: str):
            # argparse's "argument --beta: invalid float value: 'x'" -> name the launcher variable too
            match = re.match(r"argument --([a-z_]+)(?:/[^:]*)?: (.*)", message)
            if match:
                message = f"{describe(match.group(1))}: {match.group(2)}"
            raise UserInputError(message)

    parser = Parser((DataArguments, ModelArguments, PreferenceDPOConfig))
    data, model, train, unknown = parser.parse_args_and_config(args=argv, return_remaining_strings=True)
    if unknown:
        raise UserInputError(
            f"unrecognized arguments: {' '.join(unknown)} (see python train_with_preference_prompt.py --help)."
        )
    if data.test_dataset_path == "":
        data.test_dataset_path = None
    if model.reference_model_path == "":
        model.reference_model_path = None
    validate(data, model, train)
    # A short name (`smollm2`) becomes its built folder here, once every other input is known to be good: the
    # build (a download and a conversion, the first time) is the last check, and the run sees a plain folder.
    model.model_name_or_path = resolve(model.model_name_or_path, "POLICY_MODEL_PATH")
    if model.reference_model_path:
        model.reference_model_path = resolve(model.reference_model_path, "REFERENCE_MODEL_PATH")
    return data, model, train
