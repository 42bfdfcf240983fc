"""Every GPU_NODES form as DeepSpeed reads it; real DeepSpeed runs with 2 CPU ranks (ZeRO-2, ZeRO-3, signals)."""

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from preference_dpo.checkpoints import COMPLETE_MARKER, RUN_CONFIG_NAME, checkpoints

from .conftest import REPO
from .test_end_to_end import EXPECTED_OUTPUTS, scalars
from .test_ref_distill import four_pairs, sharp_model  # noqa: F401 (fixtures)
from .test_reliability import kill_session

LAUNCHER = REPO / "fast_train.sh"


def dry_run(tmp_path, **env):
    variables = {"DRY_RUN": "1", "DEVICE": "gpu", "LOG_DIR": str(tmp_path / "logs"), **env}
    out = subprocess.run(["bash", str(LAUNCHER)], env={**os.environ, **variables}, capture_output=True, text=True)
    return out, shlex.split(out.stdout)


def launcher_part(argv):
    """The deepspeed launcher's own arguments: from `deepspeed` to the entry point."""
    start = argv.index("deepspeed")
    end = next(i for i, a in enumerate(argv) if a.endswith("train_with_preference_prompt.py"))
    return argv[start:end]


def deepspeed_launch(argv, monkeypatch, gpus_per_node=8):
    """Run DeepSpeed's own runner (`deepspeed.launcher.runner.main`) on the launcher's `deepspeed` arguments, up
    to the point where it would start processes, on a machine with `gpus_per_node` GPUs. Returns the command it
    would start and the world it hands to every node ({host: [GPU ids]}, decoded from `--world_info`)."""
    import base64

    from deepspeed.accelerator import get_accelerator
    from deepspeed.launcher import runner

    started = []

    class Started:
        returncode = 0

        def __init__(self, cmd, env=None):
            started.append(cmd)

        def wait(self):
            return 0

    monkeypatch.setattr(get_accelerator(), "device_count", lambda: gpus_per_node)
    for name in get_accelerator().visible_devices_envs():
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(runner.subprocess, "Popen", Started)
    monkeypatch.setattr(runner.subprocess, "check_call", lambda *a, **k: 0)  # the ssh reachability check
    monkeypatch.setattr(runner.PDSHRunner, "backend_exists", lambda self: True)
    runner.main([*launcher_part(argv)[1:], argv[argv.index("--deepspeed") - 1], "--deepspeed", "ds_config.json"])
    (cmd,) = started
    info = next(a for a in cmd if a.startswith("--world_info=")).split("=", 1)[1]
    return cmd, json.loads(base64.urlsafe_b64decode(info))


@pytest.mark.parametrize(
    ("nodes", "expected", "world"),
    [
        ("localhost:1,2", ["deepspeed", "--master_port=29500", "--include=localhost:1,2"], {"localhost": [1, 2]}),
        ("localhost:0,1,2,3", ["deepspeed", "--master_port=29500", "--include=localhost:0,1,2,3"],
         {"localhost": [0, 1, 2, 3]}),
        # This machine by address or by name: DeepSpeed, without a hostfile, knows it only as `localhost`.
        ("127.0.0.1:0", ["deepspeed", "--master_port=29500", "--include=localhost:0"], {"localhost": [0]}),
        (f"{socket.gethostname()}:0,3", ["deepspeed", "--master_port=29500", "--include=localhost:0,3"],
         {"localhost": [0, 3]}),
    ],
)  # fmt: skip
def test_single_node_forms(tmp_path, monkeypatch, nodes, expected, world):
    _, argv = dry_run(tmp_path, GPU_NODES=nodes)
    cmd, decoded = deepspeed_launch(argv, monkeypatch)
    assert decoded == world and cmd[1:4] == ["-u", "-m", "deepspeed.launcher.launch"]  # started here, no ssh
    assert launcher_part(argv) == expected
    assert argv[argv.index("--deepspeed") + 1] == str(REPO / "ds_config.json")


@pytest.mark.parametrize(
    ("nodes", "hostfile", "include", "world"),
    [
        ("node1:0,1,node2:0,1", "node1 slots=2\nnode2 slots=2\n", "node1:0,1@node2:0,1",
         {"node1": [0, 1], "node2": [0, 1]}),
        # DeepSpeed reads `slots=N` as GPUs 0..N-1: GPUs 2 and 3 need slots=4.
        ("node1:0,1,node2:2,3", "node1 slots=2\nnode2 slots=4\n", "node1:0,1@node2:2,3",
         {"node1": [0, 1], "node2": [2, 3]}),
        # One other machine: still launched over ssh there, not here.
        ("node1:0,1", "node1 slots=2\n", "node1:0,1", {"node1": [0, 1]}),
    ],
)  # fmt: skip
def test_multi_node_form_writes_a_hostfile(tmp_path, monkeypatch, nodes, hostfile, include, world):
    _, argv = dry_run(tmp_path, GPU_NODES=nodes, MASTER_PORT="29600")
    cmd, decoded = deepspeed_launch(argv, monkeypatch)
    assert decoded == world
    written = tmp_path / "logs" / "runs" / "hostfile"
    assert written.read_text() == hostfile
    part = launcher_part(argv)
    assert part[:4] == ["deepspeed", "--master_port=29600", f"--hostfile={written}", f"--include={include}"]
    assert "--master_addr=node1" in part
    assert cmd[:6] == ["pdsh", "-S", "-f", "1024", "-w", ",".join(world)]  # started on every node, over ssh
    assert "--master_addr=node1" in cmd


def test_multi_node_without_ssh_and_explicit_master(tmp_path, monkeypatch):
    _, argv = dry_run(
        tmp_path, GPU_NODES="a:0,b:3", NODE_RANK="1", MASTER_ADDR="10.0.0.5", ZERO_STAGE="3", ALIGN_LOSS="hinge"
    )
    cmd, decoded = deepspeed_launch(argv, monkeypatch)
    assert decoded == {"a": [0], "b": [3]}
    assert (tmp_path / "logs" / "runs" / "hostfile").read_text() == "a slots=1\nb slots=4\n"
    part = launcher_part(argv)
    assert part[-4:] == ["--include=a:0@b:3", "--master_addr=10.0.0.5", "--no_ssh", "--node_rank=1"]
    assert argv[argv.index("--deepspeed") + 1] == str(REPO / "ds_config_zero3.json")
    # Started on this node only; DeepSpeed's launch.py then runs the ranks of node 1 ("b") on its GPU 3.
    assert cmd[1:4] == ["-u", "-m", "deepspeed.launcher.launch"]
    assert "--node_rank=1" in cmd and "--master_addr=10.0.0.5" in cmd
    assert list(decoded)[1] == "b"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"GPU_NODES": ""}, "GPU_NODES is empty"),
        ({"GPU_NODES": "node1"}, "host 'node1' has no GPU ids"),
        ({"GPU_NODES": "1,2"}, "must start with a host, e.g. localhost:1"),
        ({"GPU_NODES": "node1:"}, "host 'node1' has no GPU ids"),
        ({"GPU_NODES": "localhost:a"}, "GPU id 'a' of host 'localhost' is not a number"),
        ({"GPU_NODES": "localhost:1,1"}, "repeats GPU id 1 on host 'localhost'"),
        ({"GPU_NODES": "localhost:1,"}, "empty entry"),
        ({"GPU_NODES": "node1:0,node1:1"}, "names host 'node1' twice"),
        ({"GPU_NODES": "a:0,b:0", "NODE_RANK": "2"}, "NODE_RANK='2' must be a node index from 0 to 1"),
        ({"GPU_NODES": "localhost:0,node2:0"}, "'localhost' names this machine in a run on several nodes"),
        ({"GPU_NODES": "node1:0,127.0.0.1:0"}, "'127.0.0.1' names this machine in a run on several nodes"),
        ({"ZERO_STAGE": "1"}, "ZERO_STAGE='1' must be 2 or 3"),
        ({"DEVICE": "cpu", "CPU_RANKS": "0"}, "CPU_RANKS='0' must be a whole number >= 1"),
        ({"DRY_RUN": "maybe"}, "DRY_RUN='maybe' must be 1 (print the command and exit) or 0"),
        # refused before DeepSpeed starts any rank, in a dry run too; the entry point refuses it as well
        ({"ZERO_STAGE": "3"}, "ALIGN_LOSS=ref_distill is not supported with ZeRO-3 (ZERO_STAGE=3) yet"),
        ({"ZERO_STAGE": "3", "ALIGN_LOSS": "onpolicy_distill"}, "ALIGN_LOSS=onpolicy_distill is not supported"),
    ],
)
def test_bad_launcher_settings(tmp_path, env, message):
    out, _ = dry_run(tmp_path, **env)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_dry_run_takes_true_and_prints_only(tmp_path):
    out, argv = dry_run(tmp_path, DRY_RUN="true", DEVICE="cpu")
    assert out.returncode == 0 and argv[0] == "python3", out.stderr
    assert not (tmp_path / "logs" / "runs").exists()  # nothing started, no log file


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_device_gpu_without_a_gpu_is_refused_before_any_launch(tmp_path):
    out, _ = dry_run(tmp_path, DRY_RUN="0", OUTPUT_DIR=str(tmp_path / "out"))
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == (
        "fast_train.sh: error: DEVICE=gpu, but this machine has no CUDA GPU that torch can use: DEVICE=cpu (or auto), "
        "or a CUDA build of torch."
    )
    assert not (tmp_path / "out").exists() and not (tmp_path / "logs" / "runs").exists()


def test_cpu_ranks_share_the_cores(tmp_path):
    _, argv = dry_run(tmp_path, DEVICE="cpu", CPU_RANKS="2")
    threads = max(1, os.cpu_count() // 2)
    assert argv[:5] == ["env", f"OMP_NUM_THREADS={threads}", "deepspeed", "--num_gpus=2", "--master_port=29500"]


# --- real runs: 2 DeepSpeed ranks on CPU ------------------------------------------------------------------


def launch(tmp_path, model_dir, data, name, extra=(), **env):
    train, test = data
    out, logs = tmp_path / name / "out", tmp_path / name / "logs"
    variables = {
        "DEVICE": "cpu", "POLICY_MODEL_PATH": str(model_dir), "TRAIN_DATASET_PATH": str(train),
        "TEST_DATASET_PATH": str(test), "MAX_STEPS": "4", "LOGGING_STEPS": "1", "EVAL_STEPS": "4",
        "SAVE_STEPS": "4", "OUTPUT_DIR": str(out), "LOG_DIR": str(logs), "LEARNING_RATE": "1e-2",
        "LORA_DROPOUT": "0",  # dropout draws differ with the split over ranks; the runs must compare exactly
        "ALIGN_LOSS": "hinge",  # the one form the ZeRO-3 run takes too (the default, ref_distill, is refused there)
        "CACHE_DIR": str(tmp_path / "cache"), **env,  # shared by the runs: the later ones reuse it, on 2 ranks
    }  # fmt: skip
    result = subprocess.run(["bash", str(LAUNCHER), "--train_sampling_strategy", "sequential", *extra],
                            env={**os.environ, **variables}, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, logs


def train_losses(out):
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [(h["loss"], h["dpo_loss"], h["aligned_loss"]) for h in history if "loss" in h]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, small_data):
    """The same global batch of 8 pairs: 1 rank x 8, and 2 DeepSpeed ranks x 4 with ZeRO-2 and ZeRO-3."""
    tmp = tmp_path_factory.mktemp("distributed")
    return {
        "single": launch(tmp, tiny_model_dir, small_data, "single", PER_DEVICE_BATCH_SIZE="8"),
        "zero2": launch(tmp, tiny_model_dir, small_data, "zero2", PER_DEVICE_BATCH_SIZE="4", CPU_RANKS="2",
                        ZERO_STAGE="2", MASTER_PORT="29561"),
        "zero3": launch(tmp, tiny_model_dir, small_data, "zero3", PER_DEVICE_BATCH_SIZE="4", CPU_RANKS="2",
                        ZERO_STAGE="3", MASTER_PORT="29562"),
    }  # fmt: skip


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_two_ranks_write_one_set_of_outputs_and_a_usable_adapter(runs, tiny_model_dir, name):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, logs = runs[name]
    assert EXPECTED_OUTPUTS <= set(os.listdir(out))
    assert len([f for f in os.listdir(logs) if f.startswith("events")]) == 1
    run_log = next((logs / "runs").iterdir()).read_text()
    assert run_log.count("Finished 4 steps") == 1  # rank 0 alone reports
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["train_batch_size"] == 4
    assert "rewards_eval/accuracy" in scalars(logs)
    # the single-rank run filled the cache: the reference is keyed on the model's files, not on weights that
    # ZeRO-3 has sharded (or on the adapter's random start)
    assert "Reused the reference log-probs of the train pairs from the cache: no reference pass" in run_log
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_one_rank_and_two_ranks_give_the_same_losses(runs, name):
    """Same 8 pairs per step (sequential order; rank 0 gets pairs 0-3, rank 1 pairs 4-7), so the logged
    loss (averaged over ranks), its DPO part and its aligned part must match step by step. Tolerance: the
    same fp32 arithmetic reduced in another order (DeepSpeed's all-reduce, per-rank means), through 4
    AdamW steps at lr 1e-2: 1e-4 relative, plus 2e-5 absolute because the aligned loss is a difference of
    ~100-token log-prob sums, whose fp32 rounding (~1e-5) does not shrink with the difference."""
    single, distributed = train_losses(runs["single"][0]), train_losses(runs[name][0])
    assert len(single) == len(distributed) == 4
    for a, b in zip(single, distributed, strict=True):
        assert b == pytest.approx(a, rel=1e-4, abs=2e-5)
    assert single[-1][1] < single[0][1]  # and training moved: the DPO loss fell


def test_two_ranks_with_accumulation_give_the_token_mean_of_one_batch(tmp_path, sharp_model, four_pairs):  # noqa: F811
    """ref_distill top-16 token_mean, one plain SGD step (lr 1, no clipping: the adapter's change is minus the
    gradient) over the same 4 pairs: 1 rank x batch 4, and 2 DeepSpeed ranks x batch 1 x 2 accumulation steps, each
    micro-batch one pair of its own length, the teacher scored in the one LM-head pass. The logged aligned loss and
    the adapter after the step agree."""
    from safetensors.torch import load_file

    sgd = ["--optim", "sgd", "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--max_grad_norm", "0"]
    settings = {"ALIGN_LOSS": "ref_distill", "DISTILL_TOP_K": "16", "ALPHA": "1", "LEARNING_RATE": "1",
                "MAX_STEPS": "1", "NUM_SAMPLE_PROMPTS": "0"}  # fmt: skip
    data = (four_pairs, "")
    one, one_logs = launch(tmp_path, sharp_model, data, "one", PER_DEVICE_BATCH_SIZE="4", **settings, extra=sgd)
    two, two_logs = launch(tmp_path, sharp_model, data, "two", PER_DEVICE_BATCH_SIZE="1", GRADIENT_ACCUM_STEPS="2",
                           CPU_RANKS="2", MASTER_PORT="29563", **settings, extra=sgd)  # fmt: skip
    for logs in (one_logs, two_logs):  # both runs scored the teacher in the one LM-head pass (head_pass.py)
        (log,) = (logs / "runs").glob("train_*.log")
        assert "the teacher is scored in the policy's own LM-head pass" in log.read_text(), logs
    (a,), (b,) = train_losses(one), train_losses(two)
    assert b == pytest.approx(a, rel=1e-5)
    whole, split = load_file(str(one / "adapter_model.safetensors")), load_file(str(two / "adapter_model.safetensors"))
    assert any(value.abs().max() > 0 for name, value in whole.items() if "lora_B" in name)  # the step moved B
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-4, atol=1e-6)


def test_on_policy_distillation_on_two_ranks_generates_on_each_and_reruns_identically(
    tmp_path, tiny_model_dir, small_data
):
    """ALIGN_LOSS=onpolicy_distill on 2 DeepSpeed ranks (ZeRO-2), every other step on-policy: each rank samples
    answers to its own prompts (no rank waits on another's generation), the logged share of on-policy steps is
    the schedule's, and a rerun with the same seed draws the same answers: the same losses, the same adapter."""
    from safetensors.torch import load_file

    settings = {"ALIGN_LOSS": "onpolicy_distill", "ALPHA": "1", "DISTILL_ON_POLICY_FRAC": "0.5",
                "PER_DEVICE_BATCH_SIZE": "4", "CPU_RANKS": "2", "NUM_SAMPLE_PROMPTS": "0"}  # fmt: skip
    first, _ = launch(tmp_path, tiny_model_dir, small_data, "first", MASTER_PORT="29564", **settings)
    again, _ = launch(tmp_path, tiny_model_dir, small_data, "again", MASTER_PORT="29565", **settings)
    history = json.loads((first / "trainer_state.json").read_text())["log_history"]
    steps = [h for h in history if "loss" in h]
    assert [h["onpolicy_frac"] for h in steps] == [0.0, 1.0, 0.0, 1.0]
    generated = [h["onpolicy_generated_length"] for h in steps if h["onpolicy_frac"] == 1.0]
    assert len(generated) == 2 and all(0 < n <= 64 for n in generated)
    on_policy = [h["onpolicy_distill_loss"] for h in steps if h["onpolicy_frac"] == 1.0]
    assert all(loss > 0 for loss in on_policy)  # the divergence on the sampled answers is a real signal
    assert train_losses(again) == train_losses(first)
    a, b = load_file(str(first / "adapter_model.safetensors")), load_file(str(again / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


# --- stopping on a signal: every rank together --------------------------------------------------------------

AGREE = """
import json, os, signal, sys
import torch, torch.distributed as dist
from transformers import TrainerControl, TrainerState
from preference_dpo.faults import StopOnSignal

dist.init_process_group("gloo")
rank = dist.get_rank()
stopper = StopOnSignal(signals=(signal.SIGUSR1,), launched=True)
args = type("Args", (), {"device": torch.device("cpu")})()
stopper.on_train_begin(args, TrainerState(global_step=1), TrainerControl())  # resumed from checkpoint-1
state = TrainerState(global_step=3)
before = stopper.on_substep_end(args, state, TrainerControl())
if rank == 1:
    os.kill(os.getpid(), signal.SIGUSR1)
after = stopper.on_substep_end(args, state, TrainerControl())
print(json.dumps([before.should_training_stop, after.should_training_stop, after.should_save, stopper.stop_signal]))
# Tear gloo down in step: a rank that exits while the other still holds the group aborts in C++ (flaky in CI).
dist.barrier()
dist.destroy_process_group()
"""


def test_ranks_agree_to_stop_when_one_rank_gets_the_signal(tmp_path):
    """Only rank 1 is signalled; at the next micro-batch both ranks stop, on the same signal, and both save."""
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29566"}
        procs.append(subprocess.Popen([sys.executable, "-c", AGREE], env=env, cwd=REPO, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))  # fmt: skip
    results = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-2000:]
        assert json.loads(out.splitlines()[-1]) == [False, True, True, signal.SIGUSR1]


def newest_log(logs, before):
    new = [p for p in (logs / "runs").glob("train_*.log") if p not in before]
    return new[0] if new else None


def signal_mid_run(env, logs, sig, to_group, timeout=600):
    """Start fast_train.sh; once this run has logged a training step, send `sig` to the launcher (or to its whole
    process group, as Ctrl-C does); return the exit status and this run's log."""
    before = set((logs / "runs").glob("train_*.log")) if (logs / "runs").is_dir() else set()
    with open(logs.parent / "stdout.txt", "a") as stdout:
        proc = subprocess.Popen(["bash", str(LAUNCHER), "--train_sampling_strategy", "sequential"], env=env,
                                stdout=stdout, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        while sig is not None:
            log = newest_log(logs, before)
            if log is not None and "{'loss'" in log.read_text():
                os.killpg(proc.pid, sig) if to_group else proc.send_signal(sig)
                break
            assert proc.poll() is None and time.monotonic() < deadline, "the run never logged a step"
            time.sleep(0.1)
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        kill_session(proc.pid)
    return code, newest_log(logs, before).read_text()


def test_signals_under_deepspeed_save_one_checkpoint_and_resume(tmp_path, tiny_model_dir, small_data):
    """2 DeepSpeed ranks (gloo), 2 micro-batches per step. SIGTERM to fast_train.sh: one complete checkpoint (both
    ranks' ZeRO shards), exit 143, both ranks stopped at the same step. The rerun resumes from it; Ctrl-C (SIGINT to
    the launcher's process group) stops it again the same way, exit 130; the third run resumes and finishes."""
    train, _ = small_data
    out, logs = tmp_path / "out", tmp_path / "logs"
    env = {
        **os.environ, "DEVICE": "cpu", "CPU_RANKS": "2", "POLICY_MODEL_PATH": str(tiny_model_dir),
        "TRAIN_DATASET_PATH": str(train), "TEST_DATASET_PATH": "", "MAX_STEPS": "10", "PER_DEVICE_BATCH_SIZE": "2",
        "GRADIENT_ACCUM_STEPS": "2", "LOGGING_STEPS": "1", "SAVE_STEPS": "1000", "OUTPUT_DIR": str(out),
        "LOG_DIR": str(logs), "LEARNING_RATE": "1e-2", "CACHE_DIR": str(tmp_path / "cache"),
    }  # fmt: skip
    steps_done = 0
    for port, sig, to_group in ((29567, signal.SIGTERM, False), (29568, signal.SIGINT, True)):
        code, log = signal_mid_run({**env, "MASTER_PORT": str(port)}, logs, sig, to_group)
        assert code == 128 + sig, log[-3000:]
        saved = checkpoints(out)
        step, folder = saved[-1]
        assert steps_done < step < 10 and [s for s, _ in saved[:-1]] == ([steps_done] if steps_done else [])
        assert (folder / COMPLETE_MARKER).exists() and not (out / RUN_CONFIG_NAME).exists()
        for rank in (0, 1):
            assert (folder / f"rng_state_{rank}.pth").exists()
            assert list((folder / f"global_step{step}").glob(f"*zero_pp_rank_{rank}_*optim_states.pt"))
        # Both ranks stopped at that step (each says so), and this run started where the last one stopped.
        assert re.findall(r"Stopped by signal at step (\d+)", log) == [str(step)] * 2
        assert log.count("{'loss'") == step - steps_done
        if steps_done:
            assert f"Resuming from {out / f'checkpoint-{steps_done}'}" in log
        steps_done = step

    code, log = signal_mid_run({**env, "MASTER_PORT": "29569"}, logs, None, False)
    assert code == 0, log[-3000:]
    assert f"Resuming from {out / f'checkpoint-{steps_done}'}" in log and log.count("{'loss'") == 10 - steps_done
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 10
    assert (out / RUN_CONFIG_NAME).exists()


MAIN_PROCESS_FAILS = """
import sys, types
from accelerate import PartialState
from preference_dpo.errors import UserInputError
from preference_dpo.faults import leave_process_group, on_main_process, starting_checkpoint

state = PartialState(cpu=True)
args = types.SimpleNamespace(world_size=2, process_index=state.process_index, overwrite=True)

def fail():
    raise UserInputError("OUTPUT_DIR: cannot remove the previous run (read-only)")

try:
    on_main_process(fail, args) if sys.argv[1] == "compute" else starting_checkpoint(args, fail)
except UserInputError as e:
    print(f"rank {state.process_index}: {e}", flush=True)
    leave_process_group(finished=False)  # as the entry point does on every way out
    sys.exit(2)
print(f"rank {state.process_index}: went on", flush=True)
"""


@pytest.mark.parametrize("where", ["compute", "overwrite"])
def test_an_error_of_the_main_process_ends_every_rank(tmp_path, where):
    """Folder work done by the global main process alone (a digest, OVERWRITE's removal) that raises there ends
    every rank with the same error, at once: none waits in a collective the main process never reaches."""
    script = tmp_path / "fails.py"
    script.write_text(MAIN_PROCESS_FAILS)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), where],
            env={
                **os.environ,
                "PYTHONPATH": str(REPO),
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": "29587" if where == "compute" else "29588",
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=60)[0])
    finally:
        for proc in procs:
            proc.kill()
    for rank, (proc, output) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 2, output[-2000:]
        assert f"rank {rank}: OUTPUT_DIR: cannot remove the previous run (read-only)" in output


LEAVES = """
import sys, torch.distributed as dist
from preference_dpo.faults import leave_process_group
left = []
for finished in (False, True):
    dist.init_process_group("gloo", init_method=f"file://{sys.argv[1]}-{finished}", rank=0, world_size=1)
    leave_process_group(finished)
    left.append(not dist.is_initialized())
leave_process_group(False)  # no group: nothing to do
print(left)
"""


def test_every_way_out_of_a_run_leaves_the_gloo_group(tmp_path):
    """After a finished run and after an error alike (left to interpreter shutdown, gloo's threads can abort the
    process: once in about 120 two-rank exits here, status -6 instead of the error's 2)."""
    script = tmp_path / "leaves.py"
    script.write_text(LEAVES)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "store")], env=env, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip() == "[True, True]", out.stderr[-2000:]


def test_help_through_the_launcher_prints_the_flags_and_writes_no_log(tmp_path):
    env = {**os.environ, "DEVICE": "cpu", "LOG_DIR": str(tmp_path / "logs"), "OUTPUT_DIR": str(tmp_path / "out")}
    out = subprocess.run(["bash", str(LAUNCHER), "--help"], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "--aligned_loss_weight" in out.stdout, out.stderr
    assert not (tmp_path / "logs").exists() and not (tmp_path / "out").exists()
