"""The precomputed teacher of `ALIGN_LOSS=ref_distill --distill_top_k K`: computed once, read by every step.

Before training, next to TRL's reference log-probs, the frozen reference reads the guided view of every
pair once. At every response position it keeps its K most likely next-token ids, their log-probs and the
log of the remaining mass (docs/method.md, "Top-K teacher"); with them, its summed guided log-probs of both
responses (the target of `aligned_active_frac`). Training steps then run no teacher forward at all.

This module owns the store: its key, its files and their reuse.
- Key: a hash of everything the teacher depends on: the token ids of both views of every pair (the
  instruction is in them), the reference's weights, K, the soft prompt (embedding mode), the format, this
  package's source and the library versions. Anything else gives another folder.
- Files: `<folder>/<name>-<key>/shard-<i>.arrow`, one Arrow file per `SHARD_PAIRS` consecutive pairs,
  memory-mapped by every rank and joined to the data set as extra columns (as TRL joins its reference
  log-probs). Ranks compute disjoint shards (rank r: shards r, r + W, ...) into the shared folder.
- Where: with the cache on, `CACHE_DIR/teacher/` (`CACHE_TEACHER_DIR`), kept like every cache entry, so a
  rerun with another seed, learning rate, ALPHA or LoRA setting runs no teacher pass; with `CACHE=false`,
  `<output_dir>/.teacher/` (`TEACHER_DIR`), where a new store replaces the data set's older ones and the
  pipeline removes the folder once the run has finished.
- Resume: a shard is written to a temporary file and renamed once complete. A precompute that was killed
  resumes with the missing shards, and a rerun after a kill (training resumes) reuses the whole store.

Per pair, `teacher_chosen` and `teacher_rejected` hold one response each, as bytes: int32 K, then the ids
([n, K] int32), their log-probs ([n, K] float32) and log q_R ([n] float32) of its n positions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

TEACHER_DIR = ".teacher"  # under output_dir, with the cache off
CACHE_TEACHER_DIR = "teacher"  # under cache_dir
TEACHER_COLUMNS = ("teacher_chosen", "teacher_rejected")
SHARD_PAIRS = 256  # pairs per shard file: the unit a killed precompute resumes from
FORMAT_VERSION = 1
KEY_COLUMNS = ("prompt_ids", "guided_prompt_ids", "chosen_ids", "rejected_ids")


# --- one response's rows <-> bytes ---------------------------------------------------------------------


def encode_rows(ids: torch.Tensor, logps: torch.Tensor, log_rest: torch.Tensor) -> bytes:
    """One response's teacher rows ([n, K] ids, [n, K] log-probs, [n] log q_R) as bytes."""
    k = ids.shape[1]
    return b"".join(
        (
            np.int32(k).tobytes(),
            ids.to(torch.int32).cpu().numpy().tobytes(),
            logps.to(torch.float32).cpu().numpy().tobytes(),
            log_rest.to(torch.float32).cpu().numpy().tobytes(),
        )
    )


def decode_rows(data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids [n, K] int32, log-probs [n, K] float32, log q_R [n] float32), views on `data`."""
    k = int(np.frombuffer(data, dtype=np.int32, count=1)[0])
    n = (len(data) - 4) // (8 * k + 4)
    ids = np.frombuffer(data, dtype=np.int32, count=n * k, offset=4).reshape(n, k)
    logps = np.frombuffer(data, dtype=np.float32, count=n * k, offset=4 + 4 * n * k).reshape(n, k)
    log_rest = np.frombuffer(data, dtype=np.float32, count=n, offset=4 + 8 * n * k)
    return ids, logps, log_rest


def split_rows(
    ids: torch.Tensor, logps: torch.Tensor, log_rest: torch.Tensor, lengths: torch.Tensor
) -> tuple[list[bytes], list[bytes]]:
    """A batch's rows (response after response: the B chosen, then the B rejected) -> (chosen, rejected) bytes."""
    ids, logps, log_rest = ids.cpu(), logps.cpu(), log_rest.cpu()
    bounds = [0, *torch.cumsum(lengths.cpu(), 0).tolist()]
    encoded = [encode_rows(ids[a:b], logps[a:b], log_rest[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
    half = len(encoded) // 2
    return encoded[:half], encoded[half:]


def collate_teacher(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The batch's teacher rows in the base view's order (every chosen response, then every rejected one).

    `guided_teacher_lengths` (positions per response) lets the trainer check the rows against the student's.
    """
    parts = [decode_rows(ex[column]) for column in TEACHER_COLUMNS for ex in examples]
    return {
        "guided_teacher_ids": torch.from_numpy(np.concatenate([p[0] for p in parts])).long(),
        "guided_teacher_logps": torch.from_numpy(np.concatenate([p[1] for p in parts])),
        "guided_teacher_log_rest": torch.from_numpy(np.concatenate([p[2] for p in parts])),
        "guided_teacher_lengths": torch.tensor([p[0].shape[0] for p in parts]),
    }


# --- the store -------------------------------------------------------------------------------------------


def content_hash(dataset, columns: tuple[str, ...] = KEY_COLUMNS) -> str:
    """A hash of the token ids of `columns`, row by row (indices mappings and shuffles included)."""
    import pyarrow.compute as pc

    h = hashlib.sha256()
    for table in dataset.select_columns(list(columns)).with_format("arrow").iter(batch_size=4096):
        for name in columns:
            column = table.column(name)
            h.update(np.asarray(pc.list_value_length(column)).tobytes())
            h.update(np.asarray(pc.list_flatten(column)).astype(np.int64).tobytes())
    return h.hexdigest()


def store_key(dataset, top_k: int, model_hash: str, soft_prompt: torch.Tensor | None) -> str:
    from importlib.metadata import version

    from .cache import KEY_LIBRARIES, source_digest

    h = hashlib.sha256()
    code = {"source": source_digest(), "versions": {name: version(name) for name in KEY_LIBRARIES}}
    h.update(json.dumps({"format": FORMAT_VERSION, "top_k": top_k, "model": model_hash, **code}).encode())
    h.update(content_hash(dataset).encode())
    if soft_prompt is not None:
        h.update(soft_prompt.detach().to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def precompute_columns(
    dataset,
    *,
    name: str,
    folder: str | os.PathLike,
    key: str,
    batch_size: int,
    score: Callable[[list[dict[str, Any]]], dict[str, list]],
    accelerator,
    replace_others: bool = True,
):
    """`dataset` with the columns `score` returns per pair, computed once into `folder/<name>-<key>/`.

    `score(examples)` returns, for a list of pairs, a dict of equally long per-pair value lists. Every rank
    computes its shards and then reads all of them; a shard already on disk is not computed again.
    `replace_others`: remove the folder's other stores of `name` (a run's own folder; not the shared cache,
    whose entries other runs use).
    """
    from datasets import Dataset, concatenate_datasets
    from datasets.arrow_writer import ArrowWriter

    store = Path(folder) / f"{name}-{key}"
    n_shards = -(-len(dataset) // SHARD_PAIRS)
    if accelerator.is_main_process:
        for stale in Path(folder).glob(f"{name}-*") if replace_others and Path(folder).is_dir() else ():
            if stale != store:
                logger.info("Removing the outdated teacher store %s", stale)
                shutil.rmtree(stale, ignore_errors=True)
        store.mkdir(parents=True, exist_ok=True)
        meta = store / f".meta.json.{os.getpid()}.tmp"  # two runs sharing the cache may write it at once
        meta.write_text(
            json.dumps({"format": FORMAT_VERSION, "pairs": len(dataset), "shard_pairs": SHARD_PAIRS}) + "\n"
        )
        os.replace(meta, store / "meta.json")
    accelerator.wait_for_everyone()

    def shard_path(index: int) -> Path:
        return store / f"shard-{index:05d}.arrow"

    mine = range(accelerator.process_index, n_shards, accelerator.num_processes)
    todo = [i for i in mine if not shard_path(i).exists()]
    if not todo and mine:
        logger.info("Reused the top-K teacher of the %s pairs: no teacher pass (%s)", name, store)
    elif len(todo) < len(mine):
        logger.info("Teacher store %s: reusing %d of %d shards", store, len(mine) - len(todo), len(mine))
    # one bar on the main process, in pairs (its own shards: the ranks share the work evenly), not a line per shard
    pairs = sum(min(SHARD_PAIRS, len(dataset) - i * SHARD_PAIRS) for i in todo)
    with tqdm(total=pairs, desc=f"Teacher for the {name} pairs", unit="pair",
              disable=not todo or not accelerator.is_main_process) as bar:  # fmt: skip
        for index in todo:
            start = index * SHARD_PAIRS
            stop = min(start + SHARD_PAIRS, len(dataset))
            columns: dict[str, list] = {}
            for first in range(start, stop, batch_size):
                examples = [dataset[i] for i in range(first, min(first + batch_size, stop))]
                for column, values in score(examples).items():
                    columns.setdefault(column, []).extend(values)
                bar.update(len(examples))
            temporary = store / f".{shard_path(index).name}.{os.getpid()}.tmp"
            with ArrowWriter(path=str(temporary)) as writer:
                writer.write_batch(columns)
                writer.finalize()
            os.replace(temporary, shard_path(index))  # complete, or absent
    accelerator.wait_for_everyone()
    teacher = concatenate_datasets([Dataset.from_file(str(shard_path(i))) for i in range(n_shards)])
    if len(teacher) != len(dataset):  # a store from another data set cannot match the key; this is a guard
        raise RuntimeError(f"Teacher store {store} holds {len(teacher)} pairs, the {name} set {len(dataset)}.")
    return concatenate_datasets([dataset, teacher], axis=1)
