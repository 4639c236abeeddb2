"""The extracted store: the thinker text model alone, laid out so that one expert is one contiguous read.

    OUT/config.json                          the source's config.json (text dtype updated on conversion)
    OUT/<tokenizer files>                    copied from the source when present
    OUT/dense.safetensors                    every non-expert canonical tensor
    OUT/experts/layer_{i:03d}.safetensors    layer i's experts; expert e's gate, up, down are adjacent bytes
    OUT/towers.safetensors                   with extract --towers: audio_tower.*, visual.* (the omni extra)
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
from .errors import CheckpointError, Q3LabError, StoreError
from .checkpoint import ExpertPlan, ShardFiles, plan_expert, read_expert, read_expert_into
from .safetensors_io import DTYPES, SafetensorsFile, TensorInfo, read_span

FORMAT = "q3lab-store"
VERSION = 1
MANIFEST = "manifest.json"
PROGRESS = ".progress.json"
DENSE = "dense.safetensors"
TOWERS = "towers.safetensors"            # extract --towers: the audio and vision towers (q3lab.omni)
TOWER_PREFIXES = ("audio_tower.", "visual.")
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


def write_error(path: Path, err: OSError, error: type[Q3LabError] = StoreError) -> Q3LabError:
    """The error for a failed write of `path` (disk full, read-only folder, ...), naming the file."""
    hint = "; free space and rerun: finished files are kept" if err.errno == errno.ENOSPC else ""
    return error(f"{path}: cannot write: {err.strerror or err}{hint}")


def _drop(tmp: Path) -> None:
    """Remove a partial file after a failed write; a second failure must not hide the first."""
    with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)


def no_symlink_below(root: Path, path: Path, error: type[Q3LabError] = StoreError) -> None:
    """Refuse to write `path` when a folder between `root` and it is a symlink (or not a folder): a write
    there would land outside the output folder (e.g. OUT/experts -> another store's experts/)."""
    try:
        rel = path.relative_to(root)
    except ValueError:
        raise error(f"{path}: not inside the output folder {root}") from None
    cur = root
    for part in rel.parts[:-1]:
        cur = cur / part
        if cur.is_symlink():
            raise error(f"{cur}: is a symlink (to {os.readlink(cur)}); q3lab writes only inside its output "
                        f"folder and does not follow links out of it: remove the link or choose another folder")
        if cur.exists() and not cur.is_dir():
            raise error(f"{cur}: exists and is not a folder")


def _open_new(path: str, flags: int) -> int:
    """`open`'s opener for temporary files: create, never reuse and never follow a link (O_EXCL|O_NOFOLLOW):
    a `.tmp` planted as a symlink cannot redirect the write."""
    return os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)


def open_tmp(path: Path, error: type[Q3LabError] = StoreError):
    """A fresh `path.tmp` opened for binary writing (a stale one of an earlier run is removed first)."""
    tmp = tmp_path(path)
    try:
        tmp.unlink(missing_ok=True)
        return open(tmp, "wb", opener=_open_new)
    except OSError as e:
        raise write_error(path, e, error) from None


def commit_tmp(f, path: Path, error: type[Q3LabError] = StoreError) -> None:
    """Flush, fsync and close `f` (from `open_tmp(path)`), rename it to `path`, fsync the folder; on failure
    the temporary file is removed and `path` is as it was before."""
    tmp = tmp_path(path)
    try:
        f.flush()  # a full disk may only show here, when the buffer goes out
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        abort_tmp(f, path)
        raise write_error(path, e, error) from None


def abort_tmp(f, path: Path) -> None:
    """Close `f` and remove `path.tmp` (after a failure: `path` keeps its old content)."""
    if not f.closed:
        with contextlib.suppress(OSError):  # closing flushes, which fails again on a full disk
            f.close()
    _drop(tmp_path(path))


def write_atomic(path: Path, data: bytes | Path | Callable[[Any], None], *, root: Path | None = None,
                 error: type[Q3LabError] = StoreError) -> FileDigest:
    """Write `path` atomically: into `path.tmp`, fsync, rename, fsync the folder. An interrupted or failed write
    leaves `path` as it was and no `.tmp`; the error names `path` (or the source, when reading it failed).

    data: the bytes; a source file to copy (in chunks); or a function writing to the binary file it is given.
    root: the output folder; no folder between it and `path` may be a symlink.
    Returns the sha256 and size of what was written.
    """
    path = Path(path)
    if root is not None:
        no_symlink_below(Path(root), path, error)
    f = open_tmp(path, error)
    h, n = hashlib.sha256(), 0
    try:
        try:
            if isinstance(data, (bytes, bytearray, memoryview)):
                f.write(data)
                h.update(data)
                n = len(data)
            elif isinstance(data, Path):
                try:
                    src = open(data, "rb")
                except OSError as e:
                    raise CheckpointError(f"{data}: cannot read: {e.strerror or e}") from None
                with src:
                    while True:
                        try:
                            chunk = src.read(_HASH_CHUNK)
                        except OSError as e:   # the source is to blame, not the destination
                            raise CheckpointError(f"{data}: cannot read: {e.strerror or e}") from None
                        if not chunk:
                            break
                        f.write(chunk)
                        h.update(chunk)
                        n += len(chunk)
            else:
                data(f)
        except OSError as e:
            raise write_error(path, e, error) from None
    except BaseException:   # Ctrl-C included: never leave a partial `.tmp`
        abort_tmp(f, path)
        raise
    commit_tmp(f, path, error)
    if callable(data):   # not hashed (what it wrote went straight to the file): size only
        return FileDigest("", path.stat().st_size)
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
    `path.tmp` to `path` (`commit_tmp`, the skeleton `write_atomic` uses too); an exception inside `with`
    removes the temporary file. `root`: the output folder (no symlinked folder between it and `path`).
    """

    def __init__(self, path: str | Path, entries: Sequence[tuple[str, str, Sequence[int]]], *,
                 root: str | Path | None = None):
        self.path = Path(path)
        raw, data_len = safetensors_header(entries)
        self._plan = [(name, dtype, numel(shape) * itemsize(dtype)) for name, dtype, shape in entries]
        self.size = len(raw) + data_len
        self._file_hash = hashlib.sha256()
        self._tensor_hashes: dict[str, str] = {}
        self._i, self._left, self._th = -1, 0, hashlib.sha256()
        self.tmp = tmp_path(self.path)
        if root is not None:
            no_symlink_below(Path(root), self.path)
        self._f = open_tmp(self.path)
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
        commit_tmp(self._f, self.path)
        return FileDigest(self._file_hash.hexdigest(), self.size, dict(self._tensor_hashes))

    def abort(self) -> None:
        abort_tmp(self._f, self.path)

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
        # tower tensors (extract --towers) have the manifest's shapes here; the towers' config checks them on load
        expected.update({n: tuple(t["shape"]) for n, t in self._entries.items() if n.startswith(TOWER_PREFIXES)})
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

    def _header(self, rel: str) -> SafetensorsFile:
        return self._file(rel)

    def _info(self, name: str) -> TensorInfo:
        t = self._entries.get(name)
        if t is None:
            raise StoreError(f"tensor {name} is not in the store {self.path}")
        return self._file(t["file"]).tensors[name]

    def get(self, name: str) -> torch.Tensor:
        """Read one canonical tensor (dtype as stored)."""
        info = self._info(name)
        rel = self._entries[name]["file"]
        try:
            return read_span(self.path / rel, info, ident=self._file(rel).ident)
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
