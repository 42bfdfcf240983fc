"""GPU-only tests: bf16 and DeepSpeed on a real GPU, run by `bench/gpu_check.sh` on a machine with one NVIDIA GPU.

Skipped where torch sees no CUDA device (CI has none). With PREFERENCE_DPO_REQUIRE_GPU=1, which
gpu_check.sh sets, a missing GPU fails every test instead: a GPU check must never pass by skipping.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from preference_dpo.metrics import logged_tags

from .conftest import REPO
from .test_end_to_end import EXPECTED_OUTPUTS, run_launcher, scalars
from .test_trl_contract import make_trainer, perturb_adapter

REQUIRE_GPU = os.environ.get("PREFERENCE_DPO_REQUIRE_GPU") == "1"
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and not REQUIRE_GPU, reason="needs CUDA (bench/gpu_check.sh runs these on a GPU)"
)


@pytest.fixture(autouse=True)
def cuda_with_bf16():
    if not torch.cuda.is_available():
        pytest.fail(
            f"PREFERENCE_DPO_REQUIRE_GPU=1 but torch {torch.__version__} sees no CUDA device "
            f"(torch.version.cuda={torch.version.cuda}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
        )
    if not torch.cuda.is_bf16_supported():
        pytest.fail(f"{torch.cuda.get_device_name()} has no bf16 support; these tests need an Ampere or newer GPU")


# --- bf16 end to end through the launcher: DeepSpeed on one GPU ---------------------------------------------


@pytest.mark.parametrize(
    ("zero_stage", "mode", "align_loss"),
    [("2", "text", "hinge"), ("3", "text", "hinge"), ("2", "embedding", "distill")],  # distill: ZeRO-2 only
)
def test_bf16_end_to_end_with_deepspeed_on_one_gpu(tmp_path, tiny_model_dir, small_data, zero_stage, mode, align_loss):
    env = {
        "DEVICE": "gpu", "GPU_NODES": "localhost:0", "ZERO_STAGE": zero_stage, "PRECISION": "bf16",
        "TRAINING_MODE": mode, "ALIGN_LOSS": align_loss, "MASTER_PORT": f"296{zero_stage}{len(mode)}",
    }  # fmt: skip
    if mode == "embedding":
        env["PROMPT_EMBEDDING_PATH"] = str(tmp_path / "prompt_embeddings.pt")
        torch.save({"prompt_embeddings": torch.randn(4, 64) * 0.05}, env["PROMPT_EMBEDDING_PATH"])
    out, logs, result = run_launcher(tmp_path, tiny_model_dir, small_data, **env)

    assert EXPECTED_OUTPUTS <= set(os.listdir(out))
    assert "no GPU in use" not in result.stderr
    config = json.loads((out / "run_config.json").read_text())["training"]
    assert config["bf16"] is True and config["fp16"] is False
    assert config["deepspeed"].endswith("ds_config_zero3.json" if zero_stage == "3" else "ds_config.json")
    log = next((logs / "runs").iterdir()).read_text()
    assert log.count("Finished 4 steps") == 1
    peak = float(log.split("peak memory ")[1].split(" GiB")[0])  # torch.cuda.max_memory_allocated on a GPU
    assert 0 < peak < 4, log[-2000:]

    values = scalars(logs)
    expected, _ = logged_tags(align_loss)
    assert expected <= set(values), sorted(expected - set(values))
    for tag in expected | {"train/grad_norm"}:
        assert all(math.isfinite(v) for v in values[tag]), (tag, values[tag])
    assert len(values["loss/train"]) == 4
    for total, dpo, aligned in zip(
        values["loss/train"], values["loss_components/dpo_loss"], values["loss_components/aligned_loss"], strict=True
    ):
        assert total == pytest.approx(dpo + 0.1 * aligned, rel=1e-3)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).cuda()
    model = PeftModel.from_pretrained(base, out).eval()
    ids = torch.arange(3, 35, device="cuda").unsqueeze(0)
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
    assert torch.isfinite(adapted).all() and not torch.equal(adapted, plain)


# --- the shared-prompt guided view in bf16 --------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 3], ids=["text", "embedding"])
def test_shared_prompt_guided_view_equals_full_in_bf16(tiny_model_dir, tokenizer, small_data, tmp_path, k):
    """Both layouts of the guided forward, all weights in bf16 (as DeepSpeed's bf16 mode casts them), against
    the same weights computed in fp32. A layout bug (positions, cache, soft-token casts) shows as an error far
    above bf16 rounding, while the two layouts round differently: the shared layout's bf16 error must stay
    within 3x the full layout's, plus 0.02 nats. On CPU (same test, bf16 kernels of torch 2.13) both errors
    were 0.014-0.015 nats on sums of 76-192 nats, and the layouts differed by at most 0.005."""
    from preference_dpo.collator import PreferenceViewsCollator, split_views

    soft = torch.randn(3, 64, generator=torch.Generator().manual_seed(2)) * 0.1 if k else None
    trainer = make_trainer(tiny_model_dir, tokenizer, small_data, tmp_path, alpha=0.5, soft=soft)
    perturb_adapter(trainer)
    examples = [trainer.train_dataset[i] for i in range(8)]
    views = {
        mode: trainer._prepare_inputs(split_views(PreferenceViewsCollator(
            pad_token_id=tokenizer.pad_token_id, num_soft_tokens=k, guided_forward=mode)(examples))[1])
        for mode in ("full", "shared_prompt")
    }  # fmt: skip
    assert views["full"]["input_ids"].is_cuda
    model = trainer.model.eval()

    def logps(dtype):
        model.to(dtype)
        guided = {mode: trainer._guided_logps(model, view) for mode, view in views.items()}
        return {mode: torch.cat([g.chosen, g.rejected]) for mode, g in guided.items()}

    bf16 = logps(torch.bfloat16)
    exact = logps(torch.float32)  # the bf16-rounded weights, computed in fp32
    torch.testing.assert_close(exact["shared_prompt"], exact["full"], rtol=1e-5, atol=1e-3)
    full_error = (bf16["full"] - exact["full"]).abs().max().item()
    shared_error = (bf16["shared_prompt"] - exact["shared_prompt"]).abs().max().item()
    assert all(torch.isfinite(v).all() for v in bf16.values())
    assert shared_error <= 3 * full_error + 0.02, (shared_error, full_error)


# --- resume after SIGTERM on a GPU ----------------------------------------------------------------------------


def test_sigterm_on_gpu_saves_cuda_state_and_rerun_finishes(tiny_model_dir, small_data, tmp_path):
    train, test = small_data
    out = tmp_path / "out"
    argv = [
        sys.executable, str(REPO / "train_with_preference_prompt.py"), "--model_name_or_path", str(tiny_model_dir),
        "--train_dataset_path", str(train), "--test_dataset_path", str(test), "--output_dir", str(out),
        "--log_dir", str(tmp_path / "logs"), "--cache_dir", str(tmp_path / "cache"), "--per_device_train_batch_size",
        "4", "--logging_steps", "1", "--eval_strategy", "no", "--precision", "bf16", "--max_steps", "300",
        "--save_steps", "100000",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    logs, deadline = tmp_path / "logs", time.monotonic() + 180
    while not (logs.is_dir() and any(p.name.startswith("events") for p in logs.iterdir())):
        assert proc.poll() is None and time.monotonic() < deadline, "training never logged a step"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    saved = [p for p in out.iterdir() if p.name.startswith("checkpoint-")]
    assert len(saved) == 1 and 0 < int(saved[0].name.split("-")[1]) < 300
    rng = torch.load(saved[0] / "rng_state.pth", weights_only=False)
    assert "cuda" in rng  # the GPU's random state is saved, so a resumed run continues it

    rerun = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"Resuming from {saved[0]}" in rerun.stderr
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 300
    from safetensors.torch import load_file

    assert all(torch.isfinite(w).all() for w in load_file(str(out / "adapter_model.safetensors")).values())
