"""The routing-atlas dataset: a folder of Parquet parts plus `manifest.json`, written atomically and resumably.

Layout of DATASET/:
    manifest.json                         config, checkpoint/tokenizer/corpus hashes, options, planned parts
    part-{first:09d}-{end:09d}.parquet    routing of documents [first, end) of the corpus, one row per token
    part-{first:09d}-{end:09d}.done       done-marker (JSON: rows, bytes, sha256), written after the part
    logits/part-....parquet               opt-in router log-probabilities of the same tokens (--logits)

A part is complete iff its .done marker exists, names the part's byte size and sha256, and the part file
exists with that size and a readable Parquet footer whose row count equals the marker's. Parts are written
to a temporary name, fsynced, renamed, the folder fsynced; the marker follows the same way. A process killed
at any point leaves either no marker (the part is redone) or a complete part: a partial file is never taken
as complete. Parts are defined by document ranges fixed in the plan, so any set of ranks, any resume and any
`--shard i/n` produce the same parts, and the dataset is their union.

Columns (one row per token; a contract):
    doc_id string, token_index int32 (position within the document), token int32, domain string (null when
    the corpus has none), modality string (text, audio, image, video or special: `q3lab.omni.modality`; text
    corpora write "text"; since format q3lab-atlas/2, datasets of q3lab-atlas/1 read as all "text"), experts fixed_size_list<uint8>[L*A] (layer-major, rank order), weights
    fixed_size_list<float16>[L*A] (renormalised routing weights).
Bytes per token: L*A (experts) + 2*L*A (weights) + ~12 before compression: 1,164 for the real thinker
(48 layers x top-8), 580 for data/mini (48 x top-4); see README "Routing atlas" for the measured sizes.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from q3lab.errors import InputError

FORMAT = "q3lab-atlas/2"
READ_FORMATS = ("q3lab-atlas/1", FORMAT)       # /1: no modality column (read as "text")
COLUMNS = ("doc_id", "token_index", "token", "domain", "modality", "experts", "weights")
_PART = re.compile(r"^part-(\d{9})-(\d{9})\.parquet$")


def schema(num_layers: int, top_k: int) -> pa.Schema:
    """The Arrow schema of a routing part for `num_layers` layers of `top_k` experts."""
    n = num_layers * top_k
    return pa.schema([("doc_id", pa.string()), ("token_index", pa.int32()), ("token", pa.int32()),
                      ("domain", pa.string()), ("modality", pa.string()), ("experts", pa.list_(pa.uint8(), n)),
                      ("weights", pa.list_(pa.float16(), n))])


def logits_schema(num_layers: int, num_experts: int) -> pa.Schema:
    """Schema of an opt-in logits part: router log-probabilities, [L*E] per token, layer-major."""
    return pa.schema([("doc_id", pa.string()), ("token_index", pa.int32()),
                      ("logits", pa.list_(pa.float16(), num_layers * num_experts))])


def part_name(first: int, end: int) -> str:
    return f"part-{first:09d}-{end:09d}.parquet"


def sha256_file(path: Path, h=None) -> str:
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file, fsync, rename, fsync the folder."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _write_table_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd", row_group_size=65536)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def routing_table(doc_ids: list[str], token_index: np.ndarray, tokens: np.ndarray, domains: list[str | None],
                  experts: np.ndarray, weights: np.ndarray, num_layers: int, top_k: int,
                  modality: list[str] | None = None) -> pa.Table:
    """One part's table from per-token arrays: experts/weights [N, L*A] (any int / float dtype); modality
    per token (None: every token "text")."""
    from q3lab.omni.modality import MODALITIES
    n = num_layers * top_k
    N = len(token_index)
    modality = ["text"] * N if modality is None else list(modality)
    if len(modality) != N or not set(modality) <= set(MODALITIES):
        raise InputError(f"atlas: modality must be {N} labels among {list(MODALITIES)}, got {len(modality)} "
                         f"({sorted(set(map(str, modality)) - set(MODALITIES))[:4]} unknown)")
    if experts.shape != (N, n) or weights.shape != (N, n):
        raise InputError(f"atlas: experts/weights must be [{N}, {n}], got {experts.shape} / {weights.shape}")
    if N and (experts.min() < 0 or experts.max() > 255):
        raise InputError(f"atlas: expert ids must fit uint8 (0..255), found {experts.min()}..{experts.max()}")
    ex = pa.FixedSizeListArray.from_arrays(pa.array(experts.astype(np.uint8).reshape(-1)), n)
    w = pa.FixedSizeListArray.from_arrays(pa.array(weights.astype(np.float16).reshape(-1)), n)
    return pa.Table.from_arrays([pa.array(doc_ids, pa.string()), pa.array(token_index.astype(np.int32)),
                                 pa.array(tokens.astype(np.int32)), pa.array(domains, pa.string()),
                                 pa.array(modality, pa.string()), ex, w],
                                schema=schema(num_layers, top_k))


@dataclass
class Dataset:
    """An opened routing dataset: its folder, manifest and complete parts (in document order)."""
    path: Path
    manifest: dict[str, Any]
    parts: list[Path]
    logits_parts: list[Path]

    @property
    def num_layers(self) -> int:
        return int(self.manifest["config"]["num_layers"])

    @property
    def top_k(self) -> int:
        return int(self.manifest["config"]["top_k"])

    @property
    def num_experts(self) -> int:
        return int(self.manifest["config"]["num_experts"])

    @property
    def has_modality(self) -> bool:
        """False for datasets of q3lab-atlas/1, written before the modality column (every token is text)."""
        return self.manifest.get("format") != "q3lab-atlas/1"

    @property
    def complete(self) -> bool:
        """True when every part the manifest plans is complete."""
        planned = {p["name"] for p in self.manifest.get("parts", [])}
        return planned <= {p.name for p in self.parts}

    @property
    def num_tokens(self) -> int:
        return sum(pq.ParquetFile(p).metadata.num_rows for p in self.parts)

    def bytes_per_token(self) -> float:
        """Bytes on disk of the routing parts (not logits) per traced token."""
        n = self.num_tokens
        return sum(p.stat().st_size for p in self.parts) / n if n else float("nan")


class DatasetWriter:
    """Writes the manifest and parts of one dataset folder; checks and reports which parts are complete."""

    def __init__(self, path: str | Path, manifest: dict[str, Any]):
        self.path = Path(path)
        self.manifest = manifest
        self.path.mkdir(parents=True, exist_ok=True)
        self._check_or_write_manifest()

    def _check_or_write_manifest(self) -> None:
        mpath = self.path / "manifest.json"
        if mpath.exists():
            try:
                old = json.loads(mpath.read_text())
            except ValueError as e:
                raise InputError(f"{mpath}: not valid JSON ({e}); remove the folder to start over") from None
            diff = [k for k in sorted(set(old) | set(self.manifest))
                    if k != "provenance" and old.get(k) != self.manifest.get(k)]
            if diff:
                detail = "; ".join(f"{k}: was {_short(old.get(k))}, now {_short(self.manifest.get(k))}"
                                   for k in diff[:3])
                raise InputError(f"{self.path}: holds a dataset made with other inputs or options ({detail}); "
                                 f"use another --out or remove it")
            return
        write_atomic(mpath, (json.dumps(self.manifest, indent=1, sort_keys=True) + "\n").encode())

    def is_complete(self, name: str) -> bool:
        """The rule in the module docstring: marker, then file of that size and sha256, footer rows."""
        return part_complete(self.path, name)

    def write_part(self, name: str, table: pa.Table, logits: pa.Table | None = None) -> None:
        """Write a part (and its logits part), then its done-marker: each atomically, in that order."""
        if logits is not None:
            (self.path / "logits").mkdir(exist_ok=True)
            _write_table_atomic(logits, self.path / "logits" / name)
        target = self.path / name
        _write_table_atomic(table, target)
        marker = {"rows": table.num_rows, "bytes": target.stat().st_size, "sha256": sha256_file(target)}
        if logits is not None:
            lp = self.path / "logits" / name
            marker["logits"] = {"rows": logits.num_rows, "bytes": lp.stat().st_size, "sha256": sha256_file(lp)}
        write_atomic(target.with_suffix(".done"), (json.dumps(marker, sort_keys=True) + "\n").encode())


def _short(v: Any) -> str:
    s = json.dumps(v, sort_keys=True, default=str)
    return s if len(s) <= 60 else s[:57] + "..."


def _file_ok(path: Path, want: dict) -> bool:
    try:
        if path.stat().st_size != want["bytes"]:
            return False
        if pq.ParquetFile(path).metadata.num_rows != want["rows"]:
            return False
        return sha256_file(path) == want["sha256"]
    except (OSError, pa.ArrowException, KeyError, TypeError):
        return False


def part_complete(folder: Path, name: str) -> bool:
    marker = (folder / name).with_suffix(".done")
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if not _file_ok(folder / name, info):
        return False
    if "logits" in info and not _file_ok(folder / "logits" / name, info["logits"]):
        return False
    return True


def open_dataset(path: str | Path, *, require_complete: bool = False) -> Dataset:
    """Open a dataset folder: its manifest and its complete parts in document order.

    require_complete: raise InputError when some planned part is missing (an unfinished or partial run).
    """
    path = Path(path)
    mpath = path / "manifest.json"
    if not mpath.is_file():
        raise InputError(f"{path}: not a routing dataset (no manifest.json)")
    try:
        manifest = json.loads(mpath.read_text())
    except ValueError as e:
        raise InputError(f"{mpath}: not valid JSON ({e})") from None
    if manifest.get("format") not in READ_FORMATS:
        raise InputError(f"{mpath}: format {manifest.get('format')!r}, expected one of {list(READ_FORMATS)}")
    names = sorted(p.name for p in path.iterdir() if _PART.match(p.name))
    parts = [path / n for n in names if part_complete(path, n)]
    logits = [path / "logits" / p.name for p in parts if (path / "logits" / p.name).is_file()]
    ds = Dataset(path, manifest, parts, logits)
    if require_complete and not ds.complete:
        planned = [p["name"] for p in manifest.get("parts", [])]
        missing = [n for n in planned if n not in {p.name for p in parts}]
        raise InputError(f"{path}: {len(missing)} of {len(planned)} planned parts are not complete "
                         f"(first: {missing[0]}); rerun the same trace command to finish it")
    if not parts:
        raise InputError(f"{path}: no complete parts yet")
    return ds
