"""bench/gpu_check.sh refuses to run without a usable GPU: a non-zero exit and one clear line, never a pass."""

import json
import os
import subprocess

import pytest

from .conftest import REPO

SCRIPT = REPO / "bench" / "gpu_check.sh"


def test_gpu_check_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def fake_nvidia_smi(folder, script: str):
    folder.mkdir()
    tool = folder / "nvidia-smi"
    tool.write_text(f"#!/bin/sh\n{script}\n")
    tool.chmod(0o755)
    return folder


@pytest.mark.parametrize(
    ("nvidia_smi", "message"),
    [
        # the driver cannot be reached (nvidia-smi's own message): stops before any Python runs
        (
            'echo "NVIDIA-SMI has failed because it couldn\'t communicate with the NVIDIA driver."; exit 9',
            "nvidia-smi cannot reach a GPU: NVIDIA-SMI has failed",
        ),
        # a GPU is listed but torch cannot use it: a CPU-only build here; hidden by CUDA_VISIBLE_DEVICES elsewhere
        ("echo 'GPU 0: Fake GPU (UUID: GPU-0)'", "CUDA is not available"),
    ],
    ids=["no_driver", "no_cuda_in_torch"],
)
def test_gpu_check_fails_loudly_without_cuda(tmp_path, nvidia_smi, message):
    tools = fake_nvidia_smi(tmp_path / "bin", nvidia_smi)
    env = {
        **os.environ, "PATH": f"{tools}{os.pathsep}{os.environ['PATH']}", "OUT": str(tmp_path / "out"),
        "CUDA_VISIBLE_DEVICES": "", "INSTALL": "never",
    }  # fmt: skip
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    failed = [line for line in result.stderr.splitlines() if line.startswith("gpu_check.sh: FAILED:")]
    assert len(failed) == 1 and message in failed[0], result.stderr
    assert "gpu_check: FAILED" in result.stdout
    summary = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert summary["ok"] is False and message in summary["error"] and summary["stages"] == {}
