"""Reuse across runs: the tokenized views and the precomputed reference log-probs.

A user tuning BETA, ALPHA, the learning rate or the number of steps reruns the same pairs through the
same reference model, and the tokenization and the reference pass (a large part of an epoch on real
data) come out the same. This module owns what they are keyed on, and nothing else decides reuse:

- tokenized views, `tokenized_key`: the content of the split's data file (not its path or name: a copy
  elsewhere reuses the entry, and the test split's entry does not depend on the train file), every other
  data setting, the tokenizer (its saved files), the tokenization settings (instruction text and
  position, number of soft tokens, length limits), the split, this package's source and the versions of
  the libraries involved. The entry keeps the counts of dropped and truncated pairs, logged again on reuse;
- columns precomputed on a tokenized data set, `reference_fingerprint`: that data set's key plus the
  trainer's reference key and whatever else the caller names (the soft prompt's values for the guided
  view). The reference key (`PreferenceGuidedDPOTrainer._reference_key`) is the reference's weights,
  `reference_weights_key` (the files of `REFERENCE_MODEL_PATH`'s model, or of the base model whose adapter is
  turned off, and the precision; `model_digest`), plus the TRL settings that change the values (`ld_alpha`,
  `max_length`, ...). Not the adapter: TRL's own `hash_module(model)` includes its random initial values,
  so SEED or LORA_R would recompute the reference; and not the in-memory weights, which ZeRO-3 has already
  sharded. TRL's own reference precompute uses the same formula (dataset fingerprint, model hash; the
  trainer hands it the reference key) and keeps its file next to the data set, so a cached data set
  carries its reference log-probs with it. The top-K teacher store (`teacher.py`, `CACHE_DIR/teacher`) is keyed
  on the same reference key, the pairs' token ids, K, this package's source and the library versions.

None of BETA, ALPHA, the learning rate or the steps is in any key: nothing cached depends on them.
The batch size and device of the reference pass are not either: they change float rounding only.

Entries are folders under `cache_dir`. A data set entry is written by one process into a temporary
folder and renamed into place (a complete entry or none), under `main_process_first(local=False)`
(the global main process: the folders are on storage every node shares), so the other ranks find it;
decisions to reuse a precomputed column are the main process's, broadcast to all ranks.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FORMAT = 1  # bump when what an entry holds changes incompatibly
PACKAGE_DIR = Path(__file__).resolve().parent
KEY_LIBRARIES = ("datasets", "tokenizers", "transformers", "trl", "torch")
META_NAME = "preference_dpo_meta.json"
MODEL_DIGESTS_DIR = "model_digests"  # under cache_dir: a model folder's content digest, keyed on its metadata


def digest_path(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes and type (its suffix), or of every file under a folder (relative names included).

    Where the file or folder is, and a single file's name, are not in it: a copy elsewhere has the same digest.
    """
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        # in a folder the names pick the split; a single file's suffix picks its reader (.jsonl, .json, .parquet)
        digest.update(str(file.relative_to(path) if path.is_dir() else file.suffix).encode())
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


@functools.cache
def source_digest() -> str:
    """This package's source: a change to how pairs are read, tokenized or scored invalidates every entry.

    Read once per process, so that every entry a run writes carries the source it imported, even when a file is
    edited while it runs (the tokenized pairs and the teacher store would otherwise get different digests).
    """
    digest = hashlib.sha256()
    for file in sorted(PACKAGE_DIR.glob("*.py")):
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """The tokenizer as saved (vocabulary, merges, special tokens, chat template, padding token)."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return digest_path(folder)


def model_digest(path: str, revision: str | None = None, *, stamps: Path | None = None) -> str:
    """A model's identity: the content of its folder's files, or a Hub model's commit that `revision` (a branch, tag
    or commit; None: `main`) resolves to, as the loads of its files resolve it.

    Reading a large model's files takes a while (~9 s for 15 GB at 1.75 GB/s), so a folder's content digest is
    kept in `stamps/`, keyed on the folder's path and its files' names, sizes, modification and change times and
    inodes, and read
    from there while none of them changes (a copy elsewhere is hashed once and gets the same digest). Without
    `stamps` (CACHE=false: nothing is kept) a folder's identity is that metadata alone.
    """
    if os.path.isdir(path):
        files = sorted(p for p in Path(path).iterdir() if p.is_file())  # what from_pretrained reads
        metadata = make_key(
            {
                "path": str(Path(path).resolve()),
                # inode and ctime too: a file rewritten in place with its size and modification time restored
                # (`cp -p`, `rsync -a`, tar) keeps those two, but no user-space tool can set the ctime
                "files": [(f.name, *_identity(f.stat())) for f in files],
            }
        )
        if stamps is None:
            return f"files:{metadata}"
        stamp = stamps / f"{metadata}.json"
        if stamp.is_file():
            return json.loads(stamp.read_text(encoding="utf-8"))["digest"]
        digest = hashlib.sha256()
        for file in files:
            digest.update(file.name.encode())
            digest.update(digest_path(file).encode())
        stamps.mkdir(parents=True, exist_ok=True)
        partial = stamp.with_name(f".{stamp.name}.{uuid.uuid4().hex[:8]}.partial")
        partial.write_text(json.dumps({"path": str(path), "digest": digest.hexdigest()}) + "\n", encoding="utf-8")
        os.replace(partial, stamp)
        return digest.hexdigest()
    from transformers.utils import cached_file
    from transformers.utils.hub import extract_commit_hash

    resolved = cached_file(path, "config.json", revision=revision)  # already downloaded: the config was checked
    commit = extract_commit_hash(resolved, None)
    return f"{path}@{commit}" if commit else digest_path(Path(resolved).parent)


def _identity(stat: os.stat_result) -> tuple[int, int, int, int]:
    return stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns


def make_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def reference_weights_key(
    model_path: str, reference_path: str | None, precision, stamps: Path | None, revision: str | None = None
) -> str:
    """The frozen reference's weights: `reference_path`'s model, or else the base model at `model_path` and its
    `revision` (the policy with its adapter off, or before training), in `precision`. Not the adapter: its random
    initial values (SEED, LORA_R, ...) never reach the reference."""
    digest = (
        model_digest(reference_path, stamps=stamps)
        if reference_path
        else model_digest(model_path, revision, stamps=stamps)
    )
    return make_key({"model": digest, "precision": precision})


def base_weights_hash(model) -> str:
    """TRL's `hash_module` of `model` without its adapters: what the reference (the adapter off) computes with,
    for a trainer built without `reference_weights_key` (the pipeline always gives one). PEFT's wrapping is taken
    off the names, so the LoRA target modules do not change it."""
    import torch

    adapters = set(getattr(model, "peft_config", None) or ())
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if adapters & set(name.split(".")):  # lora_A.default.weight, modules_to_save.default.weight, ...
            continue
        h.update(name.removeprefix("base_model.model.").replace(".base_layer", "").encode())
        tensor = tensor.detach().cpu()
        h.update(str(tensor.dtype).encode())
        if tensor.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):  # no numpy type
            tensor = tensor.to(torch.float32)
        h.update(tensor.numpy().tobytes())
    return h.hexdigest()


# Where the data files are is not what they hold, which "data" keys: without their paths in the key, a copy of a
# file elsewhere reuses its entries, and the test split's entry does not change with TRAIN_DATASET_PATH.
DATA_PATH_FIELDS = ("train_dataset_path", "test_dataset_path")


def tokenized_key(split: str, data_path: str, data_args, tokenizer, settings: dict[str, Any]) -> str:
    """The key of one split's tokenized views (see the module docstring for what it covers)."""
    data_settings = {k: v for k, v in dataclasses.asdict(data_args).items() if k not in DATA_PATH_FIELDS}
    return make_key(
        {
            "format": FORMAT,
            "split": split,
            "data": digest_path(data_path),
            "data_args": data_settings,
            "tokenizer": tokenizer_digest(tokenizer),
            "settings": settings,
            "source": source_digest(),
            "versions": {name: version(name) for name in KEY_LIBRARIES},
        }
    )


def reference_fingerprint(dataset, model_hash: str, *extra) -> str:
    """TRL's fingerprint of a data set's precomputed reference columns, `extra` added for other columns.

    With nothing extra this is exactly `DPOTrainer._precompute_ref_logps`'s formula (the TRL contract
    test checks it), so its cache file is found where TRL will look for it.
    """
    from datasets.fingerprint import Hasher

    return Hasher.hash((dataset._fingerprint, model_hash, *extra) if extra else (dataset._fingerprint, model_hash))


def _short(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


@dataclasses.dataclass
class DatasetCache:
    """Tokenized data sets kept in `root` across runs (`enabled`), or rebuilt in `fallback` for this run only."""

    root: Path
    enabled: bool
    fallback: Path  # OUTPUT_DIR/.tokenized: a per-run copy that every rank can memory-map

    def tokenized(self, split: str, key: str, build: Callable[[], tuple[Any, dict]], train_args):
        """(data set, meta): from the cache entry `key` if there is one, else `build()`'s, saved there.

        `build` returns the tokenized data set and a JSON-serializable dict kept beside it (counts, sample
        prompts), returned again on reuse. The data set is file-backed either way, with `key` as its
        fingerprint, so that TRL's reference cache file lands beside it and is keyed on it.
        """
        from datasets import load_from_disk

        folder = self.root / "tokenized" / key / split if self.enabled else self.fallback / split
        main = train_args.process_index == 0
        # The global main process, not each node's (local=True): on the shared storage the README requires, a
        # second node's main process would read OUTPUT_DIR/.tokenized while this one rebuilds it.
        with train_args.main_process_first(local=False, desc=f"tokenizing the {split} pairs"):
            # Without the cache the main process always rebuilds the per-run copy, and the others read it.
            reused = (folder / META_NAME).is_file() and (self.enabled or not main)
            if not reused:
                dataset, meta = build()
                self._save(dataset.flatten_indices(new_fingerprint=key), meta, folder)
            dataset = load_from_disk(str(folder))
            meta = json.loads((folder / META_NAME).read_text(encoding="utf-8"))
        if main:
            if reused:
                logger.info(
                    "Reused the tokenized %s pairs (%d) from the cache: %s", split, len(dataset), _short(folder)
                )
            elif self.enabled:
                logger.info("Cached the tokenized %s pairs in %s", split, _short(folder))
        return dataset, meta

    def _save(self, dataset, meta: dict, folder: Path) -> None:
        """Write into a temporary sibling and rename it into place: a complete entry or none."""
        folder.parent.mkdir(parents=True, exist_ok=True)
        partial = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}.partial")
        dataset.save_to_disk(str(partial))
        (partial / META_NAME).write_text(json.dumps(meta, ensure_ascii=False) + "\n", encoding="utf-8")
        if folder.exists():
            if self.enabled:  # another process finished the same entry first: its copy is as good
                shutil.rmtree(partial)
                return
            shutil.rmtree(folder)  # the per-run copy of an earlier run of this output folder
        os.replace(partial, folder)

    def remove_fallback(self) -> None:
        shutil.rmtree(self.fallback, ignore_errors=True)


def cached_columns(dataset, fingerprint: str, compute: Callable[[], dict[str, list]], accelerator, what: str):
    """`dataset` with the columns `compute()` returns, reused from the file keyed on `fingerprint` if there.

    `compute` runs on every rank (it may use collective operations); the main process decides whether the
    file is there, for all ranks, and alone writes it.
    """
    from accelerate.utils import broadcast_object_list
    from datasets import Dataset, concatenate_datasets

    # The main process's path and finding, for every rank: a rank that decided otherwise would skip or run
    # the collective operations of `compute` alone.
    decision = [dataset._get_cache_file_path(fingerprint), None]
    decision[1] = os.path.exists(decision[0])
    broadcast_object_list(decision, from_process=0)
    path, found = decision
    if found:
        if accelerator.is_main_process:
            logger.info("Reused %s from the cache: %s", what, _short(Path(path)))
    else:
        columns = compute()
        if accelerator.is_main_process:  # written as TRL writes its reference columns: a map over the data set

            def select(_batch, indices):
                return {name: [values[i] for i in indices] for name, values in columns.items()}

            dataset.map(
                select,
                with_indices=True,
                batched=True,
                remove_columns=dataset.column_names,
                new_fingerprint=fingerprint,
                cache_file_name=path,
                desc=f"Caching {what}",
            )
        accelerator.wait_for_everyone()
    return concatenate_datasets([dataset, Dataset.from_file(path)], axis=1)


def log_reference_pass(dataset, model_hash: str | None, name: str, is_main_process: bool) -> None:
    """Say whether TRL's reference pass over `dataset` will be reused from its cache file or run now."""
    if not is_main_process or model_hash is None or not dataset.cache_files:
        return
    path = Path(dataset._get_cache_file_path(reference_fingerprint(dataset, model_hash)))
    if path.exists():
        logger.info(
            "Reused the reference log-probs of the %s pairs from the cache: no reference pass (%s)", name, _short(path)
        )
    else:
        logger.info("Computing the reference log-probs of the %s pairs (%d pairs, once)", name, len(dataset))


def file_backed(dataset, folder: Path, train_args):
    """The data set saved once (main process) and memory-mapped by every rank from `folder`.

    TRL's reference precompute caches its results next to the data set's files; for a data set that lives
    only in memory that is a private temporary folder per process, and every rank but 0 fails to find
    rank 0's cache. A shared file-backed copy gives all ranks the same folder (the ptune stage's data).
    """
    from datasets import load_from_disk

    with train_args.main_process_first(local=False, desc=f"saving {folder.name}"):  # one writer on shared storage
        if train_args.process_index == 0:
            if folder.exists():
                shutil.rmtree(folder)
            dataset.save_to_disk(str(folder))
    return load_from_disk(str(folder))
