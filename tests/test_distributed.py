"""Issue 3: every GPU_NODES form, and real DeepSpeed runs with 2 CPU ranks (ZeRO-2 and ZeRO-3)."""

import json
import os
import shlex
import subprocess

import pytest

from .conftest import REPO
from .test_end_to_end import EXPECTED_OUTPUTS, scalars

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


@pytest.mark.parametrize(
    ("nodes", "expected"),
    [
        ("localhost:1,2", ["deepspeed", "--master_port=29500", "--include=localhost:1,2"]),
        ("localhost:0,1,2,3", ["deepspeed", "--master_port=29500", "--include=localhost:0,1,2,3"]),
    ],
)
def test_single_node_forms(tmp_path, nodes, expected):
    _, argv = dry_run(tmp_path, GPU_NODES=nodes)
    assert launcher_part(argv) == expected
    assert argv[argv.index("--deepspeed") + 1] == str(REPO / "ds_config.json")


def test_multi_node_form_writes_a_hostfile(tmp_path):
    _, argv = dry_run(tmp_path, GPU_NODES="node1:0,1,node2:0,1", MASTER_PORT="29600")
    hostfile = tmp_path / "logs" / "runs" / "hostfile"
    assert hostfile.read_text() == "node1 slots=2\nnode2 slots=2\n"
    assert launcher_part(argv) == [
        "deepspeed", "--master_port=29600", f"--hostfile={hostfile}", "--include=node1:0,1@node2:0,1",
        "--master_addr=node1",
    ]  # fmt: skip


def test_multi_node_without_ssh_and_explicit_master(tmp_path):
    _, argv = dry_run(tmp_path, GPU_NODES="a:0,b:3", NODE_RANK="1", MASTER_ADDR="10.0.0.5", ZERO_STAGE="3")
    assert (tmp_path / "logs" / "runs" / "hostfile").read_text() == "a slots=1\nb slots=1\n"
    part = launcher_part(argv)
    assert part[-4:] == ["--include=a:0@b:3", "--master_addr=10.0.0.5", "--no_ssh", "--node_rank=1"]
    assert argv[argv.index("--deepspeed") + 1] == str(REPO / "ds_config_zero3.json")


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
        ({"ZERO_STAGE": "1"}, "ZERO_STAGE='1' must be 2 or 3"),
        ({"DEVICE": "cpu", "CPU_RANKS": "0"}, "CPU_RANKS='0' must be a whole number >= 1"),
    ],
)
def test_bad_launcher_settings(tmp_path, env, message):
    out, _ = dry_run(tmp_path, **env)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_cpu_ranks_share_the_cores(tmp_path):
    _, argv = dry_run(tmp_path, DEVICE="cpu", CPU_RANKS="2")
    threads = max(1, os.cpu_count() // 2)
    assert argv[:5] == ["env", f"OMP_NUM_THREADS={threads}", "deepspeed", "--num_gpus=2", "--master_port=29500"]


# --- real runs: 2 DeepSpeed ranks on CPU ------------------------------------------------------------------


def launch(tmp_path, model_dir, data, name, **env):
    train, test = data
    out, logs = tmp_path / name / "out", tmp_path / name / "logs"
    variables = {
        "DEVICE": "cpu", "POLICY_MODEL_PATH": str(model_dir), "TRAIN_DATASET_PATH": str(train),
        "TEST_DATASET_PATH": str(test), "MAX_STEPS": "4", "LOGGING_STEPS": "1", "EVAL_STEPS": "4",
        "SAVE_STEPS": "4", "OUTPUT_DIR": str(out), "LOG_DIR": str(logs), "LEARNING_RATE": "1e-2",
        "CACHE_DIR": str(tmp_path / "cache"), **env,  # shared by the runs: the later ones reuse it, on 2 ranks
    }  # fmt: skip
    result = subprocess.run(["bash", str(LAUNCHER), "--train_sampling_strategy", "sequential"],
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
    if name == "zero2":  # the single-rank run filled the cache; ZeRO-3 hashes its sharded weights otherwise
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
