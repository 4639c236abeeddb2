"""Extract the thinker text model from a checkpoint into a store (q3lab/store.py), and verify stores.

Extraction audits first and refuses an incomplete checkpoint; it streams one chunk at a time (memory
bounded by a few chunks, whatever the checkpoint's size), writes each file atomically, and keeps a
journal (`.progress.json`) of finished files with their sha256, so that a rerun after a crash re-checks
and skips them. The manifest is written last: a folder without it is not a store.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tqdm.auto import tqdm

from .checkpoint import INDEX, TOKENIZER_FILES, Checkpoint, expected_dtype
from .config import ThinkerConfig, expert_key, read_json
from .errors import CheckpointError, InputError, StoreError
from .safetensors_io import DTYPES, SafetensorsFile, TensorInfo, read_span
from q3lab.store import TOWER_PREFIXES, TOWERS
from .store import (DENSE, EXPERTS_DIR, FORMAT, LABEL_TO_ST, MANIFEST, PROGRESS, ST_TO_LABEL, VERSION, FileDigest,
                    SafetensorsWriter, Store, expert_file, fingerprint, fsync_dir, itemsize, numel, read_journal,
                    read_manifest, safetensors_header, sha256_file, tmp_path, with_text_dtype, write_atomic)

_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.")
_CHUNK_BYTES = 4 << 20  # source bytes per read when streaming a dense tensor (the embedding is 623 MB)
_JOURNAL_FORMAT = "q3lab-store-progress"


# -- the plan: which file holds which tensors, from where ------------------------------------------
@dataclass
class TensorPlan:
    name: str
    source_key: str
    source_shard: str
    shape: tuple[int, ...]
    src_dtype: str  # safetensors dtype names
    dst_dtype: str


@dataclass
class FilePlan:
    rel: str
    kind: str                  # "bytes" (config.json), "copy" (tokenizer files), "tensors"
    nbytes: int                # the output file's exact size
    data: bytes | None = None
    src: Path | None = None
    layer: int | None = None   # expert files
    tensors: list[TensorPlan] = field(default_factory=list)


def _tensor_plan(ckpt: Checkpoint, name: str, shape: tuple[int, ...], dtype: str | None) -> TensorPlan:
    m = _EXPERT.match(name)
    if m and int(m.group(1)) in ckpt.fused_layers:
        kind = "down_proj" if name.endswith("down_proj.weight") else "gate_up_proj"
        shard, info = ckpt.info(f"model.layers.{m.group(1)}.mlp.experts.{kind}")
        key = ckpt.source_key(f"model.layers.{m.group(1)}.mlp.experts.{kind}")
    else:
        shard, info = ckpt.info(name)
        key = ckpt.source_key(name)
        if tuple(info.shape) != tuple(shape):
            raise CheckpointError(f"tensor {key} in {shard} has shape {list(info.shape)}, expected {list(shape)}")
    return TensorPlan(name, key, shard, tuple(shape), info.dtype, LABEL_TO_ST[dtype] if dtype else info.dtype)


def tower_tensors(ckpt: Checkpoint) -> dict[str, tuple[int, ...]]:
    """The audio and vision tower tensors the checkpoint's index lists (canonical names `audio_tower.*`,
    `visual.*`) with their shapes; CheckpointError when it has none."""
    pre = ckpt.prefix
    names = sorted(k[len(pre):] for k in ckpt.weight_map
                   if k.startswith(pre) and k[len(pre):].startswith(TOWER_PREFIXES))
    if not names:
        raise CheckpointError(f"{ckpt.path}: no {pre}audio_tower.* or {pre}visual.* tensors in the index: nothing "
                              f"for --towers to extract (a text-only checkpoint)")
    return {n: tuple(ckpt.info(n)[1].shape) for n in names}


def plan_extraction(ckpt: Checkpoint, dtype: str | None = None, *,
                    towers: bool = False) -> tuple[list[FilePlan], str]:
    """The files of the store, in writing order, and the store's dtype label ("mixed" if the source is).
    towers: also `towers.safetensors` with the audio and vision towers (for `q3lab.load(store, towers=True)`)."""
    cfg = ckpt.config
    expected = cfg.expected_tensors()
    plans = {name: _tensor_plan(ckpt, name, shape, dtype) for name, shape in expected.items()}
    tower_plans = {n: _tensor_plan(ckpt, n, shape, dtype) for n, shape in tower_tensors(ckpt).items()} \
        if towers else {}
    labels = {ST_TO_LABEL.get(p.dst_dtype, p.dst_dtype) for p in plans.values()}
    store_dtype = labels.pop() if len(labels) == 1 else "mixed"

    files: list[FilePlan] = []
    src_cfg = (ckpt.path / "config.json").read_bytes()
    if dtype and expected_dtype(ckpt.raw_config) != LABEL_TO_ST[dtype]:
        src_cfg = (json.dumps(with_text_dtype(ckpt.raw_config, dtype), indent=2, ensure_ascii=False) + "\n").encode()
    files.append(FilePlan("config.json", "bytes", len(src_cfg), data=src_cfg))
    for name in TOKENIZER_FILES:
        if (ckpt.path / name).is_file():
            files.append(FilePlan(name, "copy", (ckpt.path / name).stat().st_size, src=ckpt.path / name))

    def tensor_file(rel: str, names: list[str], layer: int | None = None) -> FilePlan:
        ts = [plans.get(n) or tower_plans[n] for n in names]
        raw, data_len = safetensors_header([(t.name, t.dst_dtype, t.shape) for t in ts])
        return FilePlan(rel, "tensors", len(raw) + data_len, layer=layer, tensors=ts)

    files.append(tensor_file(DENSE, [n for n in expected if not _EXPERT.match(n)]))
    for layer in range(cfg.num_hidden_layers):
        names = [expert_key(layer, e, p) for e in range(cfg.num_experts) for p in ("gate", "up", "down")]
        files.append(tensor_file(expert_file(layer), names, layer))
    if tower_plans:   # written last: a store without them stays byte-identical to what it was
        files.append(tensor_file(TOWERS, list(tower_plans)))
    return files, store_dtype


def source_id(ckpt: Checkpoint) -> str:
    """Cheap identity of a checkpoint (config, index, shard sizes and mtimes): a resume must not mix sources."""
    h = hashlib.sha256((ckpt.path / "config.json").read_bytes())
    idx = ckpt.path / "model.safetensors.index.json"
    if idx.exists():
        h.update(idx.read_bytes())
    for shard in ckpt.shards:
        st = (ckpt.path / shard).stat()
        h.update(f"{shard}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def source_files(ckpt: Checkpoint) -> dict[str, dict[str, Any]]:
    """The identity of what a store is extracted from, for its manifest: per shard its size, mtime_ns and the
    sha256 of its header bytes as they were parsed (every read of the shard is checked against that identity);
    config.json and the index with size, mtime_ns and sha256."""
    out: dict[str, dict[str, Any]] = {}
    for name in ("config.json", INDEX):
        p = ckpt.path / name
        if p.is_file():
            st = p.stat()
            out[name] = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(p)}
    for shard in ckpt.shards:
        f = ckpt.file(shard)
        out[shard] = {"bytes": f.ident.size, "mtime_ns": f.ident.mtime_ns, "header_sha256": f.header_sha256}
    return out


def check_sources(recorded: dict[str, Any], source: Path) -> dict[str, str]:
    """Compare a manifest's `sources` with the files in `source` now: {file name: what differs}."""
    bad: dict[str, str] = {}
    for name, want in recorded.items():
        p = source / name
        if "/" in name or name.startswith(".") or not isinstance(want, dict):
            raise StoreError(f"malformed source entry {name!r} in the manifest: {str(want)[:120]}")
        if not p.is_file():
            bad[name] = "missing from the source" if not p.exists() else "not a regular file"
            continue
        st = p.stat()
        diffs = []
        if st.st_size != want.get("bytes"):
            diffs.append(f"{st.st_size} bytes, extracted from {want.get('bytes')}")
        if "header_sha256" in want:
            try:
                if SafetensorsFile(p).header_sha256 != want["header_sha256"]:
                    diffs.append("its header differs (sha256)")
            except CheckpointError as e:
                diffs.append(f"unreadable header: {e}")
        elif "sha256" in want and not diffs and sha256_file(p) != want["sha256"]:
            diffs.append("its content differs (sha256)")
        if st.st_mtime_ns != want.get("mtime_ns"):
            diffs.append("modified since the extraction (mtime)" if diffs else
                         "modified since the extraction (mtime; size and header match: the data may differ)")
        if diffs:
            bad[name] = "; ".join(diffs)
    return bad


# -- writing ---------------------------------------------------------------------------------------
def _dense_chunks(ckpt: Checkpoint, t: TensorPlan) -> Iterator[torch.Tensor]:
    """A dense tensor's elements in row-major order, `_CHUNK_BYTES` of source at a time."""
    shard, info = ckpt.info(t.name)
    ident = ckpt.file(shard).ident   # a shard replaced since its header was read stops the read
    item = itemsize(info.dtype)
    n = numel(info.shape)
    step = max(1, _CHUNK_BYTES // item)
    buf = torch.empty(min(step, n), dtype=DTYPES[info.dtype])  # reused: one allocation per tensor
    for i in range(0, n, step):
        k = min(step, n - i)
        yield read_span(ckpt.path / shard, TensorInfo(info.name, info.dtype, (k,), info.start + i * item,
                                                      info.start + (i + k) * item), out=buf[:k], ident=ident)


def _convert(x: torch.Tensor, t: TensorPlan) -> tuple[torch.Tensor, int]:
    """`x` in the store's dtype, and how many of its finite values the conversion turned into inf."""
    y = x.to(DTYPES[t.dst_dtype])
    if y.dtype == x.dtype:
        return y, 0
    return y, int((torch.isinf(y) & torch.isfinite(x)).sum())


def _refuse_overflow(t: TensorPlan, count: int) -> None:
    if count:
        dt = DTYPES[t.dst_dtype]
        raise InputError(f"tensor {t.source_key} in {t.source_shard}: {count} of {numel(t.shape)} values are "
                         f"outside the {ST_TO_LABEL[t.dst_dtype]} range (|x| > {torch.finfo(dt).max:g}) and would "
                         f"become inf; nothing of it was stored: extract without --dtype, or with bf16 or fp32")


def _write_tensor_file(ckpt: Checkpoint, out: Path, fp: FilePlan, on_bytes: Callable[[int], None]) -> FileDigest:
    with SafetensorsWriter(out / fp.rel, [(t.name, t.dst_dtype, t.shape) for t in fp.tensors], root=out) as w:
        if fp.layer is None:
            for t in fp.tensors:
                overflow = 0
                for chunk in _dense_chunks(ckpt, t):
                    chunk, bad = _convert(chunk, t)
                    overflow += bad
                    w.append(t.name, chunk)
                    on_bytes(chunk.nbytes)
                _refuse_overflow(t, overflow)   # counted over the whole tensor first, so the count is exact
        else:
            by_name = {t.name: t for t in fp.tensors}
            for e in range(ckpt.config.num_experts):
                for p, x in zip(("gate", "up", "down"), ckpt.expert(fp.layer, e)):
                    t = by_name[expert_key(fp.layer, e, p)]
                    if tuple(x.shape) != t.shape:
                        raise CheckpointError(f"tensor {t.source_key} in {t.source_shard}: expert {e} {p} has shape "
                                              f"{list(x.shape)}, expected {list(t.shape)}")
                    x, bad = _convert(x, t)
                    _refuse_overflow(t, bad)
                    w.append(t.name, x)
                    on_bytes(x.nbytes)
        digest = w.close()
    on_bytes(digest.bytes - sum(numel(t.shape) * itemsize(t.dst_dtype) for t in fp.tensors))  # the header
    return digest


def _write_file(ckpt: Checkpoint, out: Path, fp: FilePlan, on_bytes: Callable[[int], None]) -> FileDigest:
    if fp.kind == "tensors":
        return _write_tensor_file(ckpt, out, fp, on_bytes)
    digest = write_atomic(out / fp.rel, fp.data if fp.kind == "bytes" else fp.src, root=out)
    on_bytes(digest.bytes)
    return digest


# -- the output folder: refuse foreign content, resume our own -------------------------------------
@contextmanager
def _locked(out: Path) -> Iterator[None]:
    """One extraction per folder at a time (flock on the folder itself: no extra file in the store)."""
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(f"{out}: another q3lab extract is writing this folder") from None
        yield
    finally:
        os.close(fd)


def _same_source(old: dict[str, Any], ident: dict[str, Any], where: Path) -> None:
    if old.get("fingerprint") != ident["fingerprint"]:
        raise StoreError(f"{where}: this folder holds a store of a different model (fingerprint "
                         f"{str(old.get('fingerprint'))[:12]}, this checkpoint's {ident['fingerprint'][:12]}); "
                         f"choose another output folder")
    if old.get("dtype") != ident["dtype"]:
        raise StoreError(f"{where}: this folder holds a {old.get('dtype')} store, you asked for {ident['dtype']}; "
                         f"choose another output folder or remove it")
    if old.get("source_id") != ident["source_id"]:
        raise StoreError(f"{where}: this folder was extracted from {old.get('source')}, and the checkpoint "
                         f"{ident['source']} differs from it (config, index or shard sizes/mtimes changed); "
                         f"remove the folder to extract again")


def _foreign_files(out: Path, planned: set[str]) -> list[str]:
    ours = planned | {MANIFEST, PROGRESS}
    ours |= {tmp_path(Path(r)).as_posix() for r in ours}
    found = []
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if rel == EXPERTS_DIR and p.is_dir() and not p.is_symlink():  # a link would lead writes out of OUT
            continue
        if rel not in ours or p.is_dir() or p.is_symlink():
            found.append(rel)
    return found


def _open_journal(out: Path, ident: dict[str, Any], planned: set[str]) -> tuple[dict[str, Any], bool]:
    """The journal of `out` (created, loaded, or rebuilt from a finished store's manifest) and whether `out`
    is a finished store (its manifest left in place: see `_unpublish`); refuses foreign folders and stores of
    another model, dtype or source."""
    fresh = {"format": _JOURNAL_FORMAT, "version": VERSION, **ident, "files": {}}
    if (out / MANIFEST).exists():
        m = read_manifest(out)
        _same_source(m, ident, out / MANIFEST)
        files = {rel: {"sha256": d["sha256"], "bytes": d["bytes"], "tensors": {}} for rel, d in m["files"].items()}
        for t in m["tensors"]:
            files[t["file"]]["tensors"][t["name"]] = t["sha256"]
        journal = {**fresh, "files": files}
    elif (out / PROGRESS).exists():
        journal = read_journal(out / PROGRESS, _JOURNAL_FORMAT)
        _same_source(journal, ident, out / PROGRESS)
    else:
        entries = sorted(p.name for p in out.iterdir())
        if entries:
            raise StoreError(f"{out}: not empty and not a q3lab store (found {', '.join(entries[:8])}"
                             f"{' ...' if len(entries) > 8 else ''}); choose an empty or new folder")
        journal = fresh
    foreign = _foreign_files(out, planned)
    if foreign:
        raise StoreError(f"{out}: holds files that are not part of this store: {', '.join(foreign[:8])}"
                         f"{' ...' if len(foreign) > 8 else ''}; remove them or choose another folder")
    if (out / MANIFEST).exists():
        return journal, True   # a finished store stays published until a file of it must be written again
    write_atomic(out / PROGRESS, json.dumps(journal).encode(), root=out)
    return journal, False


def _unpublish(out: Path, journal: dict[str, Any]) -> None:
    """Turn a finished store back into an extraction in progress, just before one of its files is rewritten.
    The journal goes down before the manifest goes away, so that no moment leaves neither."""
    write_atomic(out / PROGRESS, json.dumps(journal).encode(), root=out)
    (out / MANIFEST).unlink()
    fsync_dir(out)


def _still_good(path: Path, done: dict[str, Any], fp: FilePlan, on_bytes: Callable[[int], None]) -> bool:
    """Is a journaled file on disk intact? (full sha256 re-check; progress counts the bytes read)."""
    if not path.is_file() or path.stat().st_size != done.get("bytes") or done.get("bytes") != fp.nbytes:
        return False
    if fp.kind == "tensors" and set(done.get("tensors", {})) != {t.name for t in fp.tensors}:
        return False
    return sha256_file(path, on_bytes) == done.get("sha256")


# -- the two entry points --------------------------------------------------------------------------
def _name_os_errors(fn):
    """OSErrors outside the store's writers (mkdir, unlink, lock in a read-only or full folder) -> StoreError."""
    @functools.wraps(fn)
    def wrapper(ckpt_path, out, *args, **kwargs):
        try:
            return fn(ckpt_path, out, *args, **kwargs)
        except OSError as e:
            raise StoreError(f"extract into {out}: {e.filename or out}: {e.strerror or e}") from None
    return wrapper


@_name_os_errors
def extract(ckpt_path: str | Path, out: str | Path, *, dtype: str | None = None, progress: bool = True,
            towers: bool = False) -> Path:
    """Extract the thinker text model of a checkpoint into the store `out`; returns `out`.

    towers: also the audio and vision towers (`towers.safetensors`, checksummed in the manifest like the rest).

    dtype: "bf16", "fp16", "fp32", or None to keep the source's. Resumes an interrupted extraction
    into the same folder (finished files are re-checked against their sha256 and kept).
    """
    if dtype is not None and dtype not in LABEL_TO_ST:
        raise InputError(f"dtype {dtype!r} is not one of {sorted(LABEL_TO_ST)}")
    from .weights import open_source
    ckpt = open_source(ckpt_path)   # refuses a checkpoint that fails the audit: nothing is extracted
    if not isinstance(ckpt, Checkpoint):
        raise CheckpointError(f"{ckpt_path}: is a q3lab store already; extract reads a checkpoint folder")
    files, store_dtype = plan_extraction(ckpt, dtype, towers=towers)
    ident = {"source": str(ckpt.path.resolve()), "source_id": source_id(ckpt),
             "fingerprint": fingerprint(ckpt.config), "dtype": store_dtype}
    sources = source_files(ckpt)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise StoreError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        planned = {f.rel for f in files}
        journal, published = _open_journal(out, ident, planned)
        for rel in planned | {MANIFEST, PROGRESS}:
            tmp_path(out / rel).unlink(missing_ok=True)  # partial files of an interrupted run
        if not (out / EXPERTS_DIR).is_dir():   # (a symlink there was refused by _open_journal)
            (out / EXPERTS_DIR).mkdir()
        bar = tqdm(total=sum(f.nbytes for f in files), unit="B", unit_scale=True, unit_divisor=1024,
                   desc=f"extract {out.name}", disable=not progress)
        try:
            for fp in files:
                done = journal["files"].get(fp.rel)
                if done is not None:
                    read = [0]

                    def count(n: int, read=read) -> None:
                        read[0] += n
                        bar.update(n)
                    if _still_good(out / fp.rel, done, fp, count):
                        continue
                    bar.update(-read[0])
                    warnings.warn(f"{out / fp.rel}: missing or changed since it was written; writing it again",
                                  stacklevel=2)
                    del journal["files"][fp.rel]
                if published:
                    _unpublish(out, journal)
                    published = False
                (out / fp.rel).unlink(missing_ok=True)
                digest = _write_file(ckpt, out, fp, bar.update)
                journal["files"][fp.rel] = {"sha256": digest.sha256, "bytes": digest.bytes, "tensors": digest.tensors}
                write_atomic(out / PROGRESS, json.dumps(journal).encode(), root=out)
        finally:
            bar.close()
        if not published:   # a finished store whose files all checked out keeps its manifest as it was
            write_atomic(out / MANIFEST, json.dumps(_manifest(ident, files, journal, sources), indent=1).encode(),
                         root=out)
            (out / PROGRESS).unlink()
            fsync_dir(out)
    Store.open(out).close()  # the store loads: manifest, config and files agree
    return out


def _manifest(ident: dict[str, Any], files: list[FilePlan], journal: dict[str, Any],
              sources: dict[str, dict[str, Any]]) -> dict[str, Any]:
    tensors = []
    for fp in files:
        for t in fp.tensors:
            tensors.append({"name": t.name, "source_key": t.source_key, "source_shard": t.source_shard,
                            "file": fp.rel, "shape": list(t.shape), "dtype": ST_TO_LABEL[t.dst_dtype],
                            "sha256": journal["files"][fp.rel]["tensors"][t.name]})
    return {"format": FORMAT, "version": VERSION, "source": ident["source"], "source_id": ident["source_id"],
            "dtype": ident["dtype"], "fingerprint": ident["fingerprint"],
            "files": {fp.rel: {"sha256": journal["files"][fp.rel]["sha256"], "bytes": journal["files"][fp.rel]["bytes"]}
                      for fp in files},
            "sources": sources,
            "tensors": tensors}


@dataclass
class VerifyReport:
    path: Path
    files: int = 0
    bytes: int = 0
    bad_files: dict[str, str] = field(default_factory=dict)    # relpath -> what is wrong
    bad_tensors: dict[str, str] = field(default_factory=dict)  # tensor name -> relpath
    extra_files: list[str] = field(default_factory=list)       # present but not in the manifest (not a failure)
    source: Path | None = None                                 # the checkpoint compared with (verify(source=))
    bad_sources: dict[str, str] = field(default_factory=dict)  # source file -> what differs from the manifest

    @property
    def ok(self) -> bool:
        return not self.bad_files and not self.bad_tensors and not self.bad_sources

    def summary(self) -> str:
        lines = [f"store: {self.path}", f"checked {self.files} files, {self.bytes / 2**20:.1f} MiB"]
        for rel, why in self.bad_files.items():
            lines.append(f"  BAD {rel}: {why}")
        for name, rel in list(self.bad_tensors.items())[:50]:
            lines.append(f"  BAD tensor {name} in {rel}: sha256 differs from the manifest")
        if len(self.bad_tensors) > 50:
            lines.append(f"  ... and {len(self.bad_tensors) - 50} more tensors")
        for rel in self.extra_files:
            lines.append(f"  note: {rel} is not in the manifest")
        if self.source is not None:
            lines.append(f"source: {self.source}")
            for name, why in self.bad_sources.items():
                lines.append(f"  BAD source {name}: {why}")
        ok = "OK: every checksum matches" + (", and the source is the one extracted from" if self.source else "")
        lines.append(ok if self.ok else
                     f"FAILED: {len(self.bad_files)} bad file(s), {len(self.bad_tensors)} bad tensor(s)"
                     + (f", {len(self.bad_sources)} source file(s) differ" if self.source else ""))
        return "\n".join(lines)


def _hash_safetensors(path: Path, on_bytes: Callable[[int], None]) -> tuple[str, dict[str, str], str | None]:
    """One pass over a file: its sha256, every tensor's sha256, and a header error if any."""
    try:
        header = SafetensorsFile(path)
    except CheckpointError as e:
        return sha256_file(path, on_bytes), {}, str(e)
    fh, th = hashlib.sha256(), {}
    with open(path, "rb") as f:
        def feed(n: int, *hashes) -> None:
            while n > 0:
                chunk = f.read(min(n, 8 << 20))
                if not chunk:
                    return
                for h in hashes:
                    h.update(chunk)
                on_bytes(len(chunk))
                n -= len(chunk)
        pos = 0
        for info in sorted(header.tensors.values(), key=lambda i: i.start):
            feed(info.start - pos, fh)
            h = hashlib.sha256()
            feed(info.nbytes, fh, h)
            th[info.name] = h.hexdigest()
            pos = info.end
        feed(header.size - pos, fh)
    return fh.hexdigest(), th, None


def verify(out: str | Path, *, progress: bool = True, strict: bool = True,
           source: str | Path | None = None) -> VerifyReport:
    """Re-check every file's and tensor's sha256 against the manifest.

    source: also check that this checkpoint folder is the one the store was extracted from, as the manifest
    recorded it (per shard: size, mtime_ns, sha256 of the header; config.json and index: sha256).
    strict: raise `StoreError` listing every bad file and tensor; otherwise return the report (`.ok`).
    A missing or unreadable manifest always raises, and so does `source` for a manifest recording none.
    """
    out = Path(out)
    m = read_manifest(out)
    report = VerifyReport(out)
    if source is not None:
        recorded = m.get("sources")
        if not isinstance(recorded, dict) or not recorded:
            raise StoreError(f"{out / MANIFEST}: records no source identity (extracted by an older q3lab); "
                             f"extract again to check it against {source}")
        if not Path(source).is_dir():
            raise StoreError(f"{source}: not a folder (expected the checkpoint the store was extracted from)")
        report.source = Path(source)
        report.bad_sources = check_sources(recorded, Path(source))
    try:
        cfg = ThinkerConfig.from_dict(read_json(out / "config.json", StoreError), where=str(out / "config.json"))
        if fingerprint(cfg) != m.get("fingerprint"):
            report.bad_files["config.json"] = "its text config does not match the manifest's fingerprint"
    except (StoreError, CheckpointError) as e:
        report.bad_files["config.json"] = str(e)
    by_file: dict[str, list[dict[str, Any]]] = {}
    for t in m["tensors"]:
        by_file.setdefault(t["file"], []).append(t)
    bar = tqdm(total=sum(d["bytes"] for d in m["files"].values()), unit="B", unit_scale=True, unit_divisor=1024,
               desc=f"verify {out.name}", disable=not progress)
    try:
        for rel, d in m["files"].items():
            p = out / rel
            report.files += 1
            if not p.is_file():
                report.bad_files[rel] = "missing"
                continue
            size = p.stat().st_size
            if size != d["bytes"]:
                report.bad_files[rel] = f"{size} bytes, the manifest says {d['bytes']}"
                continue
            report.bytes += size
            if rel in by_file:
                sha, tensor_sha, err = _hash_safetensors(p, bar.update)
                if err:
                    report.bad_files[rel] = err
                for t in by_file[rel]:
                    if tensor_sha.get(t["name"]) != t["sha256"]:
                        report.bad_tensors[t["name"]] = rel
            else:
                sha = sha256_file(p, bar.update)
            if sha != d["sha256"]:
                report.bad_files.setdefault(rel, "sha256 differs from the manifest")
    finally:
        bar.close()
    known = set(m["files"]) | {MANIFEST}
    report.extra_files = [p.relative_to(out).as_posix() for p in sorted(out.rglob("*"))
                          if p.is_file() and p.relative_to(out).as_posix() not in known]
    if report.ok:
        try:  # checksums match; manifest, config and headers must also agree (a hand-edited manifest)
            Store.open(out).close()
        except StoreError as e:
            report.bad_files[MANIFEST] = str(e)
    if strict and not report.ok:
        raise StoreError(report.summary())
    return report
