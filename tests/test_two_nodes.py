"""Two nodes on one shared output folder: the folder work at start is the global main process's alone.

Two CPU ranks pose as two nodes: each is started by its own DeepSpeed per-node launcher
(`deepspeed.launcher.launch`, as DeepSpeed's runner starts one on every node) with `--node_rank` 0 and 1,
so each is local rank 0 of its "node" and both are local main processes. The entry point runs under a
recorder that logs every `shutil.rmtree`, `Dataset.save_to_disk` and `load_from_disk` with its rank and
time. Both ranks reach each `main_process_first` together (rank 0 waits for rank 1 to arrive, as two
nodes started at once would), and rank 0's removals and saves in the output folder are slowed (slow
shared storage), so that a rank that does not wait for them shows in the record whatever the machine's load.
"""

import base64
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from preference_dpo.checkpoints import COMPLETE_MARKER, RUN_CONFIG_NAME

from .conftest import REPO, head_rows, write_jsonl
from .test_reliability import kill_session

RECORDER = """
import contextlib, json, os, shutil, sys, time

import datasets
from transformers import TrainingArguments

rank, record, root = int(os.environ["RANK"]), os.environ["FOLDER_WORK_RECORD"], os.environ["FOLDER_WORK_ROOT"]


def note(event, path, **extra):
    with open(record, "a") as f:
        f.write(json.dumps({"event": event, "rank": rank, "path": os.path.abspath(str(path)), "t": time.time(),
                            **extra}) + "\\n")


def slow_on_rank_0(path):  # slow shared storage: rank 0's work in the output folder takes a while
    if rank == 0 and os.path.abspath(str(path)).startswith(root):
        time.sleep(0.5)


real_rmtree, real_save, real_load = shutil.rmtree, datasets.Dataset.save_to_disk, datasets.load_from_disk
real_first = TrainingArguments.main_process_first


def rmtree(path, *args, **kwargs):
    note("rmtree", path)
    slow_on_rank_0(path)
    return real_rmtree(path, *args, **kwargs)


def save_to_disk(self, path, *args, **kwargs):
    slow_on_rank_0(path)
    result = real_save(self, path, *args, **kwargs)
    note("saved", path)
    return result


def load_from_disk(path, *args, **kwargs):
    note("load", path)
    return real_load(path, *args, **kwargs)


def entered(desc, by):
    with open(record) as f:
        return sum(1 for line in f if (e := json.loads(line))["event"] == "enter" and e["rank"] == by and e["desc"] == desc)


@contextlib.contextmanager
def main_process_first(self, local=True, desc="work"):
    # Both nodes reach the folder work together, as on a real cluster: rank 0 starts once rank 1 has arrived.
    note("enter", root, desc=desc)
    deadline = time.time() + 60
    while rank == 0 and entered(desc, 1) < entered(desc, 0) and time.time() < deadline:
        time.sleep(0.05)
    with real_first(self, local=local, desc=desc):
        yield


shutil.rmtree, datasets.Dataset.save_to_disk, datasets.load_from_disk = rmtree, save_to_disk, load_from_disk
TrainingArguments.main_process_first = main_process_first
sys.path.insert(0, os.environ["REPO"])
from train_with_preference_prompt import main

sys.exit(main(sys.argv[1:]))
"""


def entry_arguments(env: dict) -> list[str]:
    """The entry point's arguments as fast_train.sh passes them to 2 CPU ranks (its DRY_RUN line, from the script on)."""
    dry = subprocess.run(["bash", str(REPO / "fast_train.sh")], env={**os.environ, **env, "DRY_RUN": "1"},
                         capture_output=True, text=True, check=True)  # fmt: skip
    argv = shlex.split(dry.stdout.splitlines()[-1])
    return argv[next(i for i, a in enumerate(argv) if a.endswith("train_with_preference_prompt.py")) + 1 :]


def launch_two_nodes(tmp_path: Path, env: dict, port: int, timeout: float = 120) -> tuple[list[int], str, list[dict]]:
    """Both "nodes" started at once; their exit statuses, their output, and the recorded folder work."""
    recorder, record = tmp_path / "recorder.py", tmp_path / "folder_work.jsonl"
    recorder.write_text(RECORDER)
    world = base64.urlsafe_b64encode(json.dumps({"node-a": [0], "node-b": [0]}).encode()).decode()
    arguments = entry_arguments(env)
    variables = {**os.environ, **env, "OMP_NUM_THREADS": "1", "REPO": str(REPO), "FOLDER_WORK_RECORD": str(record),
                 "FOLDER_WORK_ROOT": env["OUTPUT_DIR"]}  # fmt: skip
    procs = []
    for node in (0, 1):
        command = [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world}",
                   f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}", str(recorder),
                   *arguments]  # fmt: skip
        log = open(tmp_path / f"node{node}.txt", "w")  # noqa: SIM115 (closed below)
        procs.append((subprocess.Popen(command, env=variables, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True), log))  # fmt: skip
    codes = []
    try:
        for proc, _ in procs:
            codes.append(proc.wait(timeout=timeout))
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            kill_session(proc.pid)
            log.close()
    output = "".join((tmp_path / f"node{node}.txt").read_text() for node in (0, 1))
    events = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    return codes, output, events


def fake_previous_run(folder: Path, tokenized: Path, complete: bool) -> list[Path]:
    """What an earlier run left in `folder`: 3 checkpoints, complete (`complete`) or all cut short by a kill while
    saving, and a per-run copy of the tokenized pairs (a kill leaves it) that no longer matches the data."""
    from datasets import Dataset

    from preference_dpo.cache import META_NAME

    saved = []
    for step in (1, 2, 3):
        checkpoint = folder / f"checkpoint-{step}"
        checkpoint.mkdir(parents=True)
        (checkpoint / "model.safetensors").write_bytes(b"old")
        if complete:
            (checkpoint / COMPLETE_MARKER).write_text("ok\n")
        saved.append(checkpoint)
    for split in ("train", "test"):
        Dataset.from_dict({"stale": [1]}).save_to_disk(str(tokenized / split))
        (tokenized / split / META_NAME).write_text('{"loaded": 1}\n')
    return saved


@pytest.mark.parametrize(("stage", "overwrite"), [("dpo", "true"), ("ptune", "false")])
def test_two_nodes_on_shared_storage_leave_the_folder_work_to_the_global_main_process(
    tmp_path, tiny_model_dir, small_data, stage, overwrite
):
    """CACHE=false, one OUTPUT_DIR, and either OVERWRITE=true over a finished run (the DPO stage) or a rerun after a
    kill during a save (the ptune stage: its checkpoints are incomplete, resume removes them). Rank 0 alone removes
    the old checkpoints and rebuilds OUTPUT_DIR/.tokenized; rank 1 (the second node's main process) removes and
    writes nothing there and reads the rebuilt copy only after rank 0 has written it. Both finish (no
    FileNotFoundError from two nodes removing one folder)."""
    train, test = small_data
    out = tmp_path / "out"
    folder = out / "ptune" if stage == "ptune" else out
    old_checkpoints = fake_previous_run(folder, folder / ".tokenized", complete=overwrite == "true")
    if overwrite == "true":
        (folder / RUN_CONFIG_NAME).write_text("{}\n")
    env = {
        "DEVICE": "cpu", "CPU_RANKS": "2", "STAGE": stage, "POLICY_MODEL_PATH": str(tiny_model_dir),
        "TRAIN_DATASET_PATH": str(write_jsonl(tmp_path / "train.jsonl", head_rows(train, 8))),
        "TEST_DATASET_PATH": str(write_jsonl(tmp_path / "test.jsonl", head_rows(test, 4))),
        "MAX_STEPS": "1", "PTUNE_MAX_STEPS": "1", "PER_DEVICE_BATCH_SIZE": "2", "EVAL_STEPS": "1000",
        "SAVE_STEPS": "1000", "NUM_SAMPLE_PROMPTS": "0", "OVERWRITE": overwrite, "CACHE": "false",
        "OUTPUT_DIR": str(out), "LOG_DIR": str(tmp_path / "logs"), "CACHE_DIR": str(tmp_path / "cache"),
    }  # fmt: skip
    codes, output, events = launch_two_nodes(tmp_path, env, port=29590 if stage == "dpo" else 29591)
    assert codes == [0, 0] and "FileNotFoundError" not in output, output[-4000:]

    def under(event, path: Path) -> bool:
        return Path(event["path"]) == path or path in Path(event["path"]).parents

    removed = [(e["rank"], Path(e["path"])) for e in events if e["event"] == "rmtree" and under(e, folder)]
    assert [path for _, path in removed if path in old_checkpoints] == old_checkpoints  # each once
    assert {rank for rank, _ in removed} == {0}, removed
    tokenized = folder / ".tokenized"

    def split(event) -> str:  # `train` for .tokenized/train and for its temporary sibling .train.<id>.partial
        return Path(event["path"]).name.lstrip(".").split(".")[0]

    saved = {split(e): e for e in events if e["event"] == "saved" and under(e, tokenized)}
    assert {e["rank"] for e in saved.values()} == {0} and "train" in saved, saved
    reads = [e for e in events if e["event"] == "load" and e["rank"] == 1 and under(e, tokenized)]
    assert {split(e) for e in reads} == set(saved)
    for read in reads:
        assert read["t"] > saved[split(read)]["t"], f"rank 1 read {read['path']} before rank 0 had rewritten it"
