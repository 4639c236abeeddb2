"""Read a Hugging Face Qwen3-Omni checkpoint folder lazily, through its index, and audit it.

A `Checkpoint` maps canonical tensor names (see docs/DESIGN.md) to the keys and shards of the folder:
the official layout (`thinker.model.layers.N...`), a thinker-only one (`model.layers.N...`), and fused
3-D expert tensors (`mlp.experts.gate_up_proj` [E, 2I, D], `mlp.experts.down_proj` [E, D, I]).
"""
from __future__ import annotations

import os
import re
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import pandas as pd
import torch

from q3lab.base import jsonio
from q3lab.base.config import ThinkerConfig, expert_key, read_json
from q3lab.errors import CheckpointError
from q3lab.base.safetensors_io import (DTYPES, FLOAT_DTYPES, FileIdent, SafetensorsFile, TensorInfo, check_ident, loads_strict,
                             pread_full)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "generation_config.json", "chat_template.json")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.")
MAX_LISTED = 50  # shard errors printed by the audit summary; the rest are counted
_FUSED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


def component_of(key: str) -> str:
    """Which part of the omni model a source key belongs to."""
    k = key[len("thinker."):] if key.startswith("thinker.") else key
    if key.startswith("talker."):
        return "talker"
    if key.startswith("code2wav."):
        return "code2wav"
    if k.startswith("audio_tower."):
        return "audio_tower"
    if k.startswith("visual."):
        return "visual"
    if k.startswith("model.") or k.startswith("lm_head."):
        return "thinker_text"
    return "other"


class ShardReader:
    """One shard file kept open for positioned reads for the life of its `Checkpoint` or `Store`.

    The descriptor is advised POSIX_FADV_RANDOM (no readahead). Each read first stats the path (about 1 us,
    where opening and closing the file per tensor cost several): a shard that vanished raises the error an
    open would have raised, and one replaced or rewritten since its header was parsed (`expect`: another
    inode, size or mtime) raises `CheckpointError` naming it: the header's offsets no longer describe it, and
    reading on would return other bytes silently. The descriptor is closed by `close()` or when the reader
    is garbage-collected.
    """

    def __init__(self, path: Path, expect: FileIdent | None = None):
        self.path = path
        self.expect = expect   # the identity of the file the header was parsed from
        self._fd = -1
        self._ident: tuple | None = None
        self._closer: weakref.finalize | None = None

    def _fd_for(self, what: str) -> int:
        try:
            st = os.stat(self.path)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open to read {what}: {e.strerror}") from None
        if self.expect is not None:
            check_ident(self.path, st, self.expect, what)
        if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != self._ident:
            self.close()
            try:
                fd = os.open(self.path, os.O_RDONLY)
            except OSError as e:
                raise CheckpointError(f"{self.path}: cannot open to read {what}: {e.strerror}") from None
            self._closer = weakref.finalize(self, os.close, fd)
            if hasattr(os, "posix_fadvise"):
                # Experts are read at random offsets; the kernel's readahead would fetch 2-3x the bytes asked
                # for (measured on this machine's disk: 0.99 GB fetched for 0.38 GB read, 0.57 vs 1.39 GB/s
                # of useful bytes). Large tensors are single big reads and need no readahead either.
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            st = os.fstat(fd)   # the file actually opened (the path may have changed since the stat above)
            self._fd, self._ident = fd, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if self.expect is not None:
                check_ident(self.path, st, self.expect, what)
        return self._fd

    def read(self, start: int, nbytes: int, what: str) -> torch.Tensor:
        """`nbytes` bytes at absolute offset `start` as a fresh uint8 tensor; `what` names them in errors
        (e.g. "tensor 'model.norm.weight'")."""
        out = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            self.read_into(start, memoryview(out.numpy()), what)
        return out

    def read_into(self, start: int, buf: memoryview, what: str) -> None:
        """Fill `buf` (a writable byte buffer) with the bytes at absolute offset `start`."""
        pread_full(self._fd_for(what), buf, start, self.path, what)

    def close(self) -> None:
        if self._closer is not None:
            self._closer()
        self._fd, self._ident, self._closer = -1, None, None


# An expert's read plan: runs of adjacent bytes in one file, each (reader, start, nbytes, pieces, what); a piece
# is (matrix index 0-2 for gate/up/down, offset in the run, end in the run, torch dtype, shape); `what` names
# the run's tensors in errors.
ExpertPlan = list[tuple["ShardReader", int, int, list[tuple[int, int, int, torch.dtype, tuple[int, ...]]], str]]


def plan_expert(parts: list[tuple[ShardReader, TensorInfo, str]], what: str | None = None) -> ExpertPlan:
    """Group gate, up, down (`parts` in that order: reader, header entry, name for errors) into runs of
    adjacent bytes of one file: one read for an expert whose matrices are stored back to back, in any order.
    Errors name a run's tensors, or `what` where given."""
    order = sorted(range(len(parts)), key=lambda i: (str(parts[i][0].path), parts[i][1].start))
    runs: list[list] = []
    for i in order:
        reader, info, name = parts[i]
        if runs and runs[-1][0] is reader and runs[-1][1] + runs[-1][2] == info.start:
            run = runs[-1]
        else:
            run = [reader, info.start, 0, [], []]
            runs.append(run)
        run[3].append((i, run[2], run[2] + info.nbytes, DTYPES[info.dtype], tuple(info.shape)))
        run[4].append(repr(name))
        run[2] += info.nbytes
    return [(r, start, n, tuple(pieces), what or ("tensor " if len(names) == 1 else "tensors ") + ", ".join(names))
            for r, start, n, pieces, names in runs]


def read_expert_into(plan: ExpertPlan, out: torch.Tensor | None) -> tuple[torch.Tensor, tuple] | None:
    """The bytes of a one-run expert read into `out` (uint8; a new one when None or too small): (the buffer,
    the run's pieces). None where the plan has several runs: then use `read_expert`."""
    if len(plan) != 1:
        return None
    reader, start, n, pieces, what = plan[0]
    if out is None or out.numel() < n:
        out = torch.empty(n, dtype=torch.uint8)
    reader.read_into(start, memoryview(out.numpy())[:n], what)
    return out, pieces


def read_expert(plan: ExpertPlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gate, up, down read by `plan`: views into one fresh buffer per run."""
    out: list = [None, None, None]
    for reader, start, n, pieces, what in plan:
        buf = reader.read(start, n, what)
        for i, a, b, dtype, shape in pieces:
            out[i] = buf[a:b].view(dtype).view(shape)
    return tuple(out)  # type: ignore[return-value]


class ShardFiles:
    """What `Checkpoint` and `Store` keep open, for files named relative to `self.path`: parsed headers,
    one `ShardReader` per file, expert read plans. `close()` drops them all (a later read opens them again)."""

    path: Path

    def _init_files(self) -> None:
        self._files: dict[str, SafetensorsFile] = {}
        self._readers: dict[str, ShardReader] = {}
        self._plans: dict[tuple[int, int], ExpertPlan] = {}

    def reader(self, rel: str) -> ShardReader:
        """The open-file reader of a file (one per file, kept until `close`), checked against the identity of
        the file its header was parsed from."""
        r = self._readers.get(rel)
        if r is None:
            r = self._readers[rel] = ShardReader(self.path / rel, self._header(rel).ident)
        return r

    def _header(self, rel: str) -> SafetensorsFile:
        """The parsed header of a file (Checkpoint.file, Store._file)."""
        raise NotImplementedError

    @property
    def tokenizer_dir(self) -> Path | None:
        return self.path if any(jsonio.exists(self.path / n, CheckpointError) for n in ("tokenizer.json", "vocab.json")) \
            else None

    def close(self) -> None:
        """Close the files (a later read opens them again)."""
        for r in self._readers.values():
            r.close()
        self._readers.clear()
        self._plans.clear()
        self._files.clear()


class Checkpoint(ShardFiles):
    """A checkpoint folder, read lazily: headers on open, tensor bytes only when asked for."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a directory (expected a checkpoint folder with config.json)")
        self.raw_config = read_json(self.path / "config.json", CheckpointError)
        self.config = ThinkerConfig.from_dict(self.raw_config, where=str(self.path / "config.json"))
        self.weight_map = self._read_index()
        self.prefix = "thinker." if any(k.startswith("thinker.") for k in self.weight_map) else ""
        self._init_files()

    @classmethod
    def open(cls, path: str | Path) -> "Checkpoint":
        return cls(path)

    # -- index and shards ----------------------------------------------------------------------
    def _read_index(self) -> dict[str, str]:
        idx = self.path / INDEX
        if jsonio.exists(idx, CheckpointError):
            data = jsonio.read_json(idx, CheckpointError, kind="index", what="index JSON")
            wm = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
                raise CheckpointError(f"{idx}: no weight_map of tensor name -> shard file")
            for shard in sorted(set(wm.values())):
                if not shard or "/" in shard or shard.startswith("."):
                    raise CheckpointError(f"{idx}: shard name {shard!r} is not a plain file name")
            return dict(wm)
        single = self.path / SINGLE
        if jsonio.exists(single, CheckpointError):
            return {name: SINGLE for name in self.file(SINGLE).tensors}
        raise CheckpointError(f"{self.path}: neither {INDEX} nor {SINGLE} found")

    @property
    def shards(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def _header(self, rel: str) -> SafetensorsFile:
        return self.file(rel)

    @cached_property
    def _shard_users(self) -> dict[str, tuple[int, str]]:
        """shard -> (number of index entries in it, the first one): built in one pass, so that reporting every
        missing shard of a large index stays linear (scanning the weight map per shard was quadratic)."""
        users: dict[str, tuple[int, str]] = {}
        for key, shard in self.weight_map.items():
            n, first = users.get(shard, (0, key))
            users[shard] = (n + 1, first)
        return users

    def file(self, shard: str) -> SafetensorsFile:
        f = self._files.get(shard)
        if f is None:
            try:
                found = jsonio.exists(self.path / shard, CheckpointError)
            except CheckpointError as e:  # e.g. a 300-character name: "File name too long"
                raise CheckpointError(f"shard {shard[:80]!r} of {self.path} cannot be opened: "
                                      f"{str(e).rsplit(': ', 1)[-1]}") from None
            if not found:
                n, first = self._shard_users.get(shard, (0, "-"))
                raise CheckpointError(f"shard {shard} is missing from {self.path}; the index lists "
                                      f"{n} tensors in it, e.g. {first}")
            f = self._files[shard] = SafetensorsFile(self.path / shard)
        return f

    # -- canonical names -> source keys ----------------------------------------------------------
    def source_key(self, name: str) -> str:
        return self.prefix + name

    def shard_of(self, name: str) -> str | None:
        return self.weight_map.get(self.source_key(name))

    @cached_property
    def fused_layers(self) -> set[int]:
        out = set()
        for key in self.weight_map:
            m = _FUSED.match(key[len(self.prefix):]) if key.startswith(self.prefix) else None
            if m:
                out.add(int(m.group(1)))
        return out

    def info(self, name: str) -> tuple[str, TensorInfo]:
        """(shard, header entry) of a canonical tensor; errors name the tensor and shard."""
        key = self.source_key(name)
        shard = self.weight_map.get(key)
        if shard is None:
            raise CheckpointError(f"tensor {key} is missing: not in {INDEX if (self.path / INDEX).exists() else SINGLE}"
                                  f" of {self.path}")
        f = self.file(shard)
        if key not in f:
            raise CheckpointError(f"tensor {key} is listed in the index for shard {shard}, but that shard "
                                  f"does not contain it")
        return shard, f.tensors[key]

    def get(self, name: str) -> torch.Tensor:
        """Read one canonical tensor (shape-checked against the config)."""
        m = _EXPERT.match(name)
        if m and int(m.group(1)) in self.fused_layers:
            layer, e = int(m.group(1)), int(m.group(2))
            g, u, d = self.expert(layer, e)
            return {"gate_proj": g, "up_proj": u, "down_proj": d}[name.split(".")[-2]]
        shard, info = self.info(name)
        expected = self.config.expected_tensors().get(name) if not m else None
        if m:
            I, D = self.config.moe_intermediate_size, self.config.hidden_size
            expected = (D, I) if name.endswith("down_proj.weight") else (I, D)
        if expected is not None and tuple(info.shape) != tuple(expected):
            raise CheckpointError(f"tensor {self.source_key(name)} in {shard} has shape {list(info.shape)}, "
                                  f"expected {list(expected)} from config.json")
        if info.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"tensor {self.source_key(name)} in {shard} has dtype {info.dtype}, "
                                  f"expected one of {sorted(FLOAT_DTYPES)}")
        return self.file(shard).read(self.source_key(name))

    def expert(self, layer: int, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """gate [I, D], up [I, D], down [D, I] of expert e in a layer; reads only that expert's bytes, in one
        read where the three matrices are adjacent in one shard (the hub layout writes them so)."""
        plan = self._plan(layer, e)
        if plan is None:
            I = self.config.moe_intermediate_size
            gu = self._fused_slice(f"model.layers.{layer}.mlp.experts.gate_up_proj", e)
            dn = self._fused_slice(f"model.layers.{layer}.mlp.experts.down_proj", e)
            return gu[:I].clone(), gu[I:].clone(), dn
        return read_expert(plan)

    def expert_into(self, layer: int, e: int, out: torch.Tensor | None) -> tuple[torch.Tensor, tuple] | None:
        """Expert e's bytes read into the reusable uint8 buffer `out` (replaced by a larger one if needed):
        (buffer, pieces), a piece being (0-2 for gate/up/down, start, end, dtype, shape) in the buffer; None
        where its matrices are not one run of adjacent bytes (use `expert`). What an expert cache reads with."""
        plan = self._plan(layer, e)
        return None if plan is None else read_expert_into(plan, out)

    def _plan(self, layer: int, e: int) -> ExpertPlan | None:
        """Expert e's read plan, made once; None for a layer stored as fused tensors."""
        plan = self._plans.get((layer, e))
        if plan is None and layer not in self.fused_layers:
            plan = self._plans[(layer, e)] = self._expert_plan(layer, e)
        return plan

    def _expert_plan(self, layer: int, e: int) -> ExpertPlan:
        """Where expert e's three matrices are, checked once (shape and dtype, as `get` checks them)."""
        I, D = self.config.moe_intermediate_size, self.config.hidden_size
        parts = []
        for p, expected in (("gate", (I, D)), ("up", (I, D)), ("down", (D, I))):
            name = expert_key(layer, e, p)
            shard, info = self.info(name)
            if tuple(info.shape) != expected:
                raise CheckpointError(f"tensor {self.source_key(name)} in {shard} has shape {list(info.shape)}, "
                                      f"expected {list(expected)} from config.json")
            if info.dtype not in FLOAT_DTYPES:
                raise CheckpointError(f"tensor {self.source_key(name)} in {shard} has dtype {info.dtype}, "
                                      f"expected one of {sorted(FLOAT_DTYPES)}")
            parts.append((self.reader(shard), info, self.source_key(name)))
        return plan_expert(parts)

    def _fused_slice(self, name: str, e: int) -> torch.Tensor:
        shard, info = self.info(name)
        E = info.shape[0]
        if not 0 <= e < E:
            raise CheckpointError(f"expert {e} out of range for fused tensor {self.source_key(name)} [{E}, ...]")
        per = info.nbytes // E
        buf = self.reader(shard).read(info.start + e * per, per, f"tensor {info.name!r}")
        return buf.view(DTYPES[info.dtype]).view(info.shape[1:])

    def names(self) -> list[str]:
        return list(self.config.expected_tensors())


# -- the audit ---------------------------------------------------------------------------------
@dataclass
class AuditReport:
    path: Path
    frame: pd.DataFrame               # one row per expected thinker-text tensor (+ unexpected ones)
    components: pd.DataFrame          # tensors and bytes per component
    straddling: dict[int, list[str]]  # layer -> shards its tensors live in (only layers in more than one)
    errors: list[str] = field(default_factory=list)  # shard-level problems (missing shard, corrupt header)

    @property
    def ok(self) -> bool:
        return not self.errors and bool((self.frame["status"] == "ok").all())

    def problems(self) -> pd.DataFrame:
        return self.frame[self.frame["status"] != "ok"]

    def summary(self) -> str:
        """The text report printed by `q3lab audit`."""
        f = self.frame
        lines = [f"checkpoint: {self.path}"]
        lines.append("\nbytes per component:")
        for _, r in self.components.iterrows():
            lines.append(f"  {r['component']:<13} {int(r['tensors']):>7} tensors  {r['bytes'] / 2**30:10.3f} GiB")
        exp = f[f["status"] != "unexpected"]
        found = exp[exp["status"] != "missing"]
        lines.append(f"\nthinker text: {len(found)} of {len(exp)} expected tensors found")
        experts = exp[exp["expert"] >= 0]
        if len(experts):
            per_layer = experts[experts["status"] != "missing"].groupby("layer")["expert"].nunique()
            n_layers = int(exp["layer"].max()) + 1
            total_e = experts["expert"].max() + 1
            complete = sum(int(per_layer.get(layer, 0)) == total_e for layer in range(n_layers))
            lines.append(f"experts: {complete} of {n_layers} layers have all {total_e} experts "
                         f"({int(per_layer.sum())} experts with at least one matrix found)")
        for status in ("missing", "shape", "dtype", "unreadable", "unexpected"):
            rows = f[f["status"] == status]
            if len(rows):
                lines.append(f"\n{status}: {len(rows)}")
                for _, r in rows.head(20).iterrows():
                    lines.append(f"  {r['key']}  [{r['detail']}]")
                if len(rows) > 20:
                    lines.append(f"  ... and {len(rows) - 20} more")
        for e in self.errors[:MAX_LISTED]:
            lines.append(f"\nerror: {e}")
        if len(self.errors) > MAX_LISTED:   # an index naming 50k missing shards would print 50k paragraphs
            lines.append(f"\n... and {len(self.errors) - MAX_LISTED} more errors ({len(self.errors)} in all)")
        if self.straddling:
            lines.append(f"\nlayers straddling shards: {len(self.straddling)}")
            for layer, shards in list(self.straddling.items())[:10]:
                lines.append(f"  layer {layer}: {', '.join(shards)}")
        lines.append("\nOK: the thinker text model is complete" if self.ok
                     else "\nFAILED: the thinker text model is incomplete or inconsistent")
        return "\n".join(lines)


def expected_dtype(raw_config: dict) -> str | None:
    for cfg in (raw_config.get("thinker_config", {}).get("text_config", {}), raw_config.get("thinker_config", {}),
                raw_config):
        d = cfg.get("torch_dtype") or cfg.get("dtype") if isinstance(cfg, dict) else None
        if isinstance(d, str):
            return {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}.get(d)
    return None


def audit_checkpoint(ckpt: Checkpoint) -> AuditReport:
    """Check every tensor the config implies against the index and the shard headers."""
    cfg = ckpt.config
    want_dtype = expected_dtype(ckpt.raw_config)
    errors: list[str] = []
    headers: dict[str, SafetensorsFile | None] = {}
    for shard in ckpt.shards:
        try:
            headers[shard] = ckpt.file(shard)
        except CheckpointError as e:
            headers[shard] = None
            errors.append(str(e))
    # duplicates: one key in the headers of two shards
    seen: dict[str, str] = {}
    for shard, f in headers.items():
        for key in (f.tensors if f else {}):
            if key in seen:
                errors.append(f"duplicate tensor {key} in {seen[key]} and {shard}")
            seen[key] = shard

    fused = ckpt.fused_layers
    rows = []
    layer_shards: dict[int, set[str]] = defaultdict(set)
    for name, shape in cfg.expected_tensors().items():
        m = _EXPERT.match(name)
        layer = int(_LAYER.match(name).group(1)) if _LAYER.match(name) else -1
        expert = int(m.group(2)) if m else -1
        if m and layer in fused:
            kind = "gate_up_proj" if not name.endswith("down_proj.weight") else "down_proj"
            src_name = f"model.layers.{layer}.mlp.experts.{kind}"
            I = cfg.moe_intermediate_size
            shape = (cfg.num_experts, 2 * I, cfg.hidden_size) if kind == "gate_up_proj" else \
                (cfg.num_experts, cfg.hidden_size, I)
            if name.endswith("up_proj.weight") and kind == "gate_up_proj":
                continue  # gate and up are one fused tensor: count it once, under gate
            if expert > 0:
                continue
            expert = -1
        else:
            src_name = name
        key = ckpt.source_key(src_name)
        shard = ckpt.weight_map.get(key)
        row = dict(name=src_name, key=key, component="thinker_text", layer=layer, expert=expert,
                   expected_shape=str(list(shape)), shape="", dtype="", shard=shard or "", bytes=0,
                   status="ok", detail="")
        if shard is None:
            row.update(status="missing", detail="not in the index")
        elif headers.get(shard) is None:
            row.update(status="unreadable", detail=f"shard {shard} missing or corrupt")
        elif key not in headers[shard].tensors:
            row.update(status="missing", detail=f"index points to {shard}, which does not contain it")
        else:
            info = headers[shard].tensors[key]
            row.update(shape=str(list(info.shape)), dtype=info.dtype, bytes=info.nbytes)
            if tuple(info.shape) != tuple(shape):
                row.update(status="shape", detail=f"{shard}: found {list(info.shape)}, expected {list(shape)}")
            elif info.dtype not in FLOAT_DTYPES or (want_dtype and info.dtype != want_dtype):
                row.update(status="dtype", detail=f"{shard}: found {info.dtype}, expected "
                                                  f"{want_dtype or 'a float dtype'}")
            if layer >= 0:
                layer_shards[layer].add(shard)
        if row["status"] == "missing":
            row["detail"] += f" (in {shard})" if shard else ""
        rows.append(row)

    expected_keys = {r["key"] for r in rows}
    comp_rows: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for key, shard in ckpt.weight_map.items():
        comp = component_of(key)
        f = headers.get(shard)
        info = f.tensors.get(key) if f else None
        comp_rows[comp][0] += 1
        comp_rows[comp][1] += info.nbytes if info else 0
        if comp == "thinker_text" and key not in expected_keys and key.startswith(ckpt.prefix):
            m = _LAYER.match(key[len(ckpt.prefix):])
            rows.append(dict(name=key[len(ckpt.prefix):], key=key, component=comp,
                             layer=int(m.group(1)) if m else -1, expert=-1, expected_shape="",
                             shape=str(list(info.shape)) if info else "", dtype=info.dtype if info else "",
                             shard=shard, bytes=info.nbytes if info else 0, status="unexpected",
                             detail="not implied by config.json"))
    components = pd.DataFrame([dict(component=c, tensors=v[0], bytes=v[1]) for c, v in sorted(comp_rows.items())],
                              columns=["component", "tensors", "bytes"])
    straddling = {layer: sorted(s) for layer, s in sorted(layer_shards.items()) if len(s) > 1}
    frame = pd.DataFrame(rows)
    return AuditReport(ckpt.path, frame, components, straddling, errors)


def audit(path: str | Path) -> pd.DataFrame:
    """Audit a checkpoint folder; one row per tensor with a `status` column ('ok' when all is well).

    The full report (components, straddling layers, shard errors) is in `.attrs["report"]`.
    """
    report = audit_checkpoint(Checkpoint(path))
    frame = report.frame.copy()
    frame.attrs["report"] = report
    return frame
