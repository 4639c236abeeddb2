"""The extracted store: the thinker text model alone, laid out so that one expert is one contiguous read.

    OUT/config.json                          the source's config.json (text dtype updated on conversion)
    OUT/<tokenizer files>                    copied from the source when present
    OUT/dense.safetensors                    every non-expert canonical tensor
    OUT/experts/layer_{i:03d}.safetensors    layer i's experts; expert e's gate, up, down are adjacent bytes
    OUT/manifest.json                        written last: files and tensors with their sha256

A folder with `.progress.json` and no `manifest.json` is an extraction in progress (see q3lab/extract.py).
This module holds the format: the streaming writer, atomic file writes, checksums and the `Store` reader.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import jsonio
from .config import ThinkerConfig, expert_key, find_text_config, read_json
from .errors import CheckpointError, StoreError
from .checkpoint import ExpertPlan, ShardFiles, plan_expert, read_expert, read_expert_into
from .safetensors_io import DTYPES, SafetensorsFile, TensorInfo, read_span

FORMAT = "q3lab-store"
VERSION = 1
MANIFEST = "manifest.json"
PROGRESS = ".progress.json"
DENSE = "dense.safetensors"
EXPERTS_DIR = "experts"
TMP_SUFFIX = ".tmp"
# Short dtype labels (CLI, manifest) -> safetensors dtype names -> config.json names.
LABEL_TO_ST = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}
ST_TO_LABEL = {v: k for k, v in LABEL_TO_ST.items()}
LABEL_TO_CONFIG = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_HASH_CHUNK = 8 << 20


def expert_file(layer: int) -> str:
    """Relative path of a layer's expert file inside a store."""
    return f"{EXPERTS_DIR}/layer_{layer:03d}.safetensors"


def fingerprint(config: ThinkerConfig) -> str:
    """sha256 of the canonical text-config JSON: equal for two stores of the same architecture."""
    text = json.dumps(config.to_text_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def itemsize(st_dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[st_dtype]).element_size()


def numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# -- atomic files ----------------------------------------------------------------------------------
def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (a crash after os.replace must not resurrect the old name)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_path(path: Path) -> Path:
    return path.with_name(path.name + TMP_SUFFIX)


@dataclass
class FileDigest:
    sha256: str
    bytes: int
    tensors: dict[str, str] = field(default_factory=dict)  # tensor name -> sha256 of its stored bytes


def write_error(path: Path, err: OSError) -> StoreError:
    """The StoreError for a failed write of `path` (disk full, read-only folder, ...), naming the file."""
    hint = "; free space and rerun: finished files are kept" if err.errno == errno.ENOSPC else ""
    return StoreError(f"{path}: cannot write: {err.strerror or err}{hint}")


def _drop(tmp: Path) -> None:
    """Remove a partial file after a failed write; a second failure must not hide the first."""
    with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: Path, data: bytes) -> FileDigest:
    """Write `data` to `path` via `path.tmp`, fsync, rename; on failure no `.tmp` is left and StoreError names `path`."""
    tmp = tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        _drop(tmp)
        raise write_error(path, e) from None
    return FileDigest(hashlib.sha256(data).hexdigest(), len(data))


def copy_file_atomic(src: Path, dst: Path) -> FileDigest:
    """Copy in chunks, hashing as we go, via `dst.tmp` then rename (failures as in `write_bytes_atomic`)."""
    h, n = hashlib.sha256(), 0
    tmp = tmp_path(dst)
    try:
        with open(src, "rb") as fi, open(tmp, "wb") as fo:
            while chunk := fi.read(_HASH_CHUNK):
                fo.write(chunk)
                h.update(chunk)
                n += len(chunk)
            fo.flush()
            os.fsync(fo.fileno())
        os.replace(tmp, dst)
        fsync_dir(dst.parent)
    except OSError as e:
        _drop(tmp)
        raise write_error(dst, e) from None
    return FileDigest(h.hexdigest(), n)


def sha256_file(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    """sha256 of a whole file, read in chunks; `on_bytes(n)` reports progress."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
            if on_bytes:
                on_bytes(len(chunk))
    return h.hexdigest()


def safetensors_header(entries: Sequence[tuple[str, str, Sequence[int]]]) -> tuple[bytes, int]:
    """(the 8-byte length + JSON header, data length) of a file holding `entries` back to back, in order."""
    header: dict[str, Any] = {}
    off = 0
    for name, dtype, shape in entries:
        if name in header:
            raise ValueError(f"tensor {name} listed twice")
        n = numel(shape) * itemsize(dtype)
        header[name] = {"dtype": dtype, "shape": [int(s) for s in shape], "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format allows space padding; 8-byte alignment lets readers map in place
    return len(raw).to_bytes(8, "little") + raw, off


# -- the streaming writer -------------------------------------------------------------------------
class SafetensorsWriter:
    """Write a .safetensors file tensor by tensor, chunk by chunk, with memory bounded by one chunk.

    The header is computed up front from (name, dtype, shape) in file order; `append` then streams each
    tensor's bytes in that order, hashing the file and every tensor as it goes. `close` fsyncs and renames
    `path.tmp` to `path`; an exception inside `with` removes the temporary file.
    """

    def __init__(self, path: str | Path, entries: Sequence[tuple[str, str, Sequence[int]]]):
        self.path = Path(path)
        raw, data_len = safetensors_header(entries)
        self._plan = [(name, dtype, numel(shape) * itemsize(dtype)) for name, dtype, shape in entries]
        self.size = len(raw) + data_len
        self._file_hash = hashlib.sha256()
        self._tensor_hashes: dict[str, str] = {}
        self._i, self._left, self._th = -1, 0, hashlib.sha256()
        self.tmp = tmp_path(self.path)
        try:
            self._f = open(self.tmp, "wb")
        except OSError as e:
            raise write_error(self.path, e) from None
        try:
            self._write(raw)
        except StoreError:
            self.abort()  # not yet inside `with`: nobody else would remove the partial file
            raise
        self._advance()

    def _write(self, data) -> None:
        try:
            self._f.write(data)
        except OSError as e:
            raise write_error(self.path, e) from None
        self._file_hash.update(data)

    def _advance(self) -> None:
        """Move to the next tensor that still needs bytes (zero-size tensors are complete at once)."""
        while self._left == 0 and self._i < len(self._plan):
            if self._i >= 0:
                self._tensor_hashes[self._plan[self._i][0]] = self._th.hexdigest()
            self._i += 1
            self._th = hashlib.sha256()
            self._left = self._plan[self._i][2] if self._i < len(self._plan) else 0

    @property
    def current(self) -> str | None:
        """The tensor the next `append` must belong to (None when all are written)."""
        return self._plan[self._i][0] if self._i < len(self._plan) else None

    def append(self, name: str, chunk: torch.Tensor) -> None:
        """Append the next bytes of tensor `name` (its elements in row-major order, any chunking)."""
        if name != self.current:
            raise ValueError(f"{self.path}: expected bytes of {self.current}, got {name}")
        want = DTYPES[self._plan[self._i][1]]
        if chunk.dtype != want:
            raise ValueError(f"{self.path}: tensor {name} is {self._plan[self._i][1]}, got a {chunk.dtype} chunk")
        data = chunk.contiguous().reshape(-1).view(torch.uint8).numpy()
        if data.nbytes > self._left:
            raise ValueError(f"{self.path}: tensor {name} overflows: {data.nbytes} bytes given, {self._left} left")
        mv = memoryview(data)
        self._write(mv)
        self._th.update(mv)
        self._left -= data.nbytes
        self._advance()

    def close(self) -> FileDigest:
        """Check every tensor is complete, fsync, rename into place; return the file's and tensors' sha256."""
        if self.current is not None:
            raise ValueError(f"{self.path}: closed before tensor {self.current} was complete")
        try:
            self._f.flush()  # a full disk may only show here, when the buffer goes out
            os.fsync(self._f.fileno())
            self._f.close()
            os.replace(self.tmp, self.path)
            fsync_dir(self.path.parent)
        except OSError as e:
            self.abort()
            raise write_error(self.path, e) from None
        return FileDigest(self._file_hash.hexdigest(), self.size, dict(self._tensor_hashes))

    def abort(self) -> None:
        if not self._f.closed:
            with contextlib.suppress(OSError):  # closing flushes, which fails again on a full disk
                self._f.close()
        _drop(self.tmp)

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


# -- the reader -----------------------------------------------------------------------------------
def _is_size(v: Any) -> bool:
    return type(v) is int and v >= 0


def _check_files(files: Any, where: Path, *, journal: bool) -> None:
    """A manifest's or journal's `files`: relative path -> {sha256, bytes[, tensors: name -> sha256]}."""
    if not isinstance(files, dict):
        raise StoreError(f"{where}: malformed: 'files' is {type(files).__name__}, expected an object")
    for rel, d in files.items():
        ok = isinstance(d, dict) and isinstance(d.get("sha256"), str) and _is_size(d.get("bytes"))
        if ok and journal:
            tensors = d.get("tensors", {})
            ok = isinstance(tensors, dict) and all(isinstance(v, str) for v in tensors.values())
        if not ok:
            raise StoreError(f"{where}: malformed entry for file {rel}: {str(d)[:120]}")
        if rel.startswith("/") or ".." in Path(rel).parts:
            raise StoreError(f"{where}: file {rel!r} is not a path inside the store")


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of a complete store; StoreError if absent (saying whether an extraction is under way).

    Read within `q3lab.jsonio`'s bounds (a regular file, capped size and nesting), then checked field by field:
    a hostile manifest raises StoreError naming it, never a TypeError in a later step."""
    mpath = path / MANIFEST
    if not jsonio.exists(mpath, StoreError):
        if jsonio.exists(path / PROGRESS, StoreError):
            raise StoreError(f"{path}: incomplete extraction ({PROGRESS} but no {MANIFEST}), rerun q3lab extract")
        raise StoreError(f"{path}: no {MANIFEST}: not a q3lab store")
    m = jsonio.read_json(mpath, StoreError, kind="manifest")
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise StoreError(f"{mpath}: format is {m.get('format') if isinstance(m, dict) else m!r:.80}, "
                         f"expected {FORMAT!r}")
    if m.get("version") != VERSION:
        raise StoreError(f"{mpath}: version {m.get('version')!r:.80}, this q3lab reads version {VERSION}")
    files, tensors = m.get("files"), m.get("tensors")
    if not isinstance(files, dict) or not isinstance(tensors, list):
        raise StoreError(f"{mpath}: malformed: expected 'files' (object) and 'tensors' (list)")
    _check_files(files, mpath, journal=False)
    for key in ("fingerprint", "dtype", "source", "source_id"):
        if not isinstance(m.get(key, ""), str):
            raise StoreError(f"{mpath}: malformed: {key!r} is {m[key]!r:.80}, expected a string")
    for t in tensors:
        if not (isinstance(t, dict) and all(isinstance(t.get(k), str) for k in ("name", "file", "dtype", "sha256"))
                and isinstance(t.get("shape"), list) and all(_is_size(s) for s in t["shape"])
                and isinstance(t.get("source_key", ""), str)):
            raise StoreError(f"{mpath}: malformed tensor entry: {str(t)[:120]}")
        if t["file"] not in files:
            raise StoreError(f"{mpath}: tensor {t['name']} is in {t['file']}, which the manifest's files lack")
    return m


def read_journal(path: Path, fmt: str) -> dict[str, Any]:
    """An extraction journal (`.progress.json`) of format `fmt`, read within `q3lab.jsonio`'s bounds and checked
    field by field; anything else raises StoreError naming it."""
    hint = "; remove the folder to start over"
    try:
        journal = jsonio.read_json(path, StoreError, kind="journal")
    except StoreError as e:
        raise StoreError(f"unreadable journal: {e}{hint}") from None
    if not isinstance(journal, dict) or journal.get("format") != fmt or not isinstance(journal.get("files"), dict):
        raise StoreError(f"{path}: not a q3lab extraction journal{hint}")
    try:
        _check_files(journal["files"], path, journal=True)
    except StoreError as e:
        raise StoreError(f"{e}{hint}") from None
    return journal


class Store(ShardFiles):
    """An extracted store, read lazily: the same interface as `Checkpoint` (`get`, `expert`, `config`...).

    Opening checks that manifest, config and files agree (sizes, header tensor sets, shapes, dtypes, one
    expert's matrices adjacent); the full checksum pass is `q3lab.extract.verify`.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise StoreError(f"{self.path}: not a directory (expected a q3lab store)")
        self.manifest = read_manifest(self.path)
        self.raw_config = read_json(self.path / "config.json", StoreError)
        try:
            self.config = ThinkerConfig.from_dict(self.raw_config, where=str(self.path / "config.json"))
        except CheckpointError as e:
            raise StoreError(str(e)) from None
        if fingerprint(self.config) != self.manifest.get("fingerprint"):
            raise StoreError(f"{self.path / 'config.json'}: its text config does not match the manifest's "
                             f"fingerprint (config {fingerprint(self.config)[:12]}, manifest "
                             f"{str(self.manifest.get('fingerprint'))[:12]}): the store was altered")
        self._entries: dict[str, dict[str, Any]] = {t["name"]: t for t in self.manifest["tensors"]}
        self._init_files()
        self._check()

    @classmethod
    def open(cls, path: str | Path) -> "Store":
        return cls(path)

    def _check(self) -> None:
        for rel, d in self.manifest["files"].items():
            p = self.path / rel
            if not p.is_file():
                raise StoreError(f"{p}: missing (listed in {MANIFEST})")
            if p.stat().st_size != d["bytes"]:
                raise StoreError(f"{p}: {p.stat().st_size} bytes, {MANIFEST} says {d['bytes']}")
        expected = self.config.expected_tensors()
        have = set(self._entries)
        if have != set(expected) or len(self._entries) != len(self.manifest["tensors"]):
            missing, extra = sorted(set(expected) - have), sorted(have - set(expected))
            raise StoreError(f"{self.path / MANIFEST}: tensors disagree with config.json: "
                             f"{len(missing)} missing (e.g. {missing[:3]}), {len(extra)} unexpected "
                             f"(e.g. {extra[:3]}), {len(self.manifest['tensors']) - len(have)} duplicated")
        by_file: dict[str, set[str]] = {}
        for name, t in self._entries.items():
            by_file.setdefault(t["file"], set()).add(name)
        for rel, names in by_file.items():
            f = self._file(rel)
            if set(f.tensors) != names:
                diff = sorted(set(f.tensors) ^ names)
                raise StoreError(f"{self.path / rel}: header tensors differ from {MANIFEST}: {diff[:5]}")
            for name in names:
                info, t = f.tensors[name], self._entries[name]
                st = LABEL_TO_ST.get(t["dtype"])
                if list(info.shape) != list(t["shape"]) or list(info.shape) != list(expected[name]) or info.dtype != st:
                    raise StoreError(f"{self.path / rel}: tensor {name} is {info.dtype}{list(info.shape)}, manifest "
                                     f"says {t['dtype']}{t['shape']}, config implies {list(expected[name])}")
        # one expert = one read: its gate, up, down must be adjacent, in that order
        for layer in range(self.config.num_hidden_layers):
            for e in range(self.config.num_experts):
                names = [expert_key(layer, e, p) for p in ("gate", "up", "down")]
                infos = [self._info(n) for n in names]
                if len({self._entries[n]["file"] for n in names}) != 1 or \
                        infos[0].end != infos[1].start or infos[1].end != infos[2].start:
                    raise StoreError(f"{self.path / self._entries[names[0]]['file']}: expert {e} of layer {layer} "
                                     f"is not stored contiguously (gate, up, down adjacent)")

    def _file(self, rel: str) -> SafetensorsFile:
        f = self._files.get(rel)
        if f is None:
            try:
                f = self._files[rel] = SafetensorsFile(self.path / rel)
            except CheckpointError as e:
                raise StoreError(str(e)) from None
        return f

    def _info(self, name: str) -> TensorInfo:
        t = self._entries.get(name)
        if t is None:
            raise StoreError(f"tensor {name} is not in the store {self.path}")
        return self._file(t["file"]).tensors[name]

    def get(self, name: str) -> torch.Tensor:
        """Read one canonical tensor (dtype as stored)."""
        info = self._info(name)
        try:
            return read_span(self.path / self._entries[name]["file"], info)
        except CheckpointError as e:
            raise StoreError(str(e)) from None

    def expert_location(self, layer: int, e: int) -> tuple[Path, int, int]:
        """(file, byte offset, byte count) of expert e's gate+up+down: one contiguous span."""
        if not (0 <= layer < self.config.num_hidden_layers and 0 <= e < self.config.num_experts):
            raise StoreError(f"expert ({layer}, {e}) out of range: {self.config.num_hidden_layers} layers, "
                             f"{self.config.num_experts} experts")
        g, d = self._info(expert_key(layer, e, "gate")), self._info(expert_key(layer, e, "down"))
        return self.path / self._entries[expert_key(layer, e, "gate")]["file"], g.start, d.end - g.start

    def expert(self, layer: int, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """gate [I, D], up [I, D], down [D, I]: one positioned read of the expert's bytes."""
        try:
            return read_expert(self._expert_plan(layer, e))
        except CheckpointError as e_:
            raise StoreError(str(e_)) from None

    def expert_into(self, layer: int, e: int, out: torch.Tensor | None) -> tuple[torch.Tensor, tuple] | None:
        """As `Checkpoint.expert_into`: the expert's bytes read into a reusable buffer, and where each is."""
        try:
            return read_expert_into(self._expert_plan(layer, e), out)
        except CheckpointError as e_:
            raise StoreError(str(e_)) from None

    def _expert_plan(self, layer: int, e: int) -> ExpertPlan:
        plan = self._plans.get((layer, e))
        if plan is None:
            self.expert_location(layer, e)   # range-checks layer and e
            reader = self.reader(self._entries[expert_key(layer, e, "gate")]["file"])
            # _check verified gate, up, down adjacent in one file: this plan is a single read
            plan = self._plans[(layer, e)] = plan_expert(
                [(reader, self._info(expert_key(layer, e, p)), expert_key(layer, e, p))
                 for p in ("gate", "up", "down")],
                what=f"tensor 'expert {e} of layer {layer}'")
        return plan

    def names(self) -> list[str]:
        return list(self.config.expected_tensors())

    def source_key(self, name: str) -> str:
        """The checkpoint key this tensor was extracted from (provenance, from the manifest)."""
        return self._entries[name].get("source_key", name)

    def file_of(self, name: str) -> str:
        """The store file (relative path) this tensor is read from."""
        return self._entries[name]["file"]

    def shard_of(self, name: str) -> str | None:
        """As `Checkpoint.shard_of`: the file this tensor is read from (here a store file), None if absent."""
        t = self._entries.get(name)
        return t["file"] if t else None

    @property
    def dtype(self) -> str:
        return str(self.manifest.get("dtype"))



def with_text_dtype(raw_config: dict[str, Any], label: str) -> dict[str, Any]:
    """A copy of config.json whose thinker text config declares dtype `label` (the others are untouched)."""
    cfg = json.loads(json.dumps(raw_config))
    text = find_text_config(cfg)
    keys = [k for k in ("torch_dtype", "dtype") if k in text] or ["dtype"]
    for k in keys:
        text[k] = LABEL_TO_CONFIG[label]
    return cfg
