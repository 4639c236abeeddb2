"""A strict safetensors reader: validate the header, then read single tensors with positioned reads.

We parse the format ourselves (8-byte little-endian header length, JSON header, raw data) so that every
way a file can be broken ends in a `CheckpointError` naming the file and tensor, and so that reading one
expert touches only that expert's bytes.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from q3lab.base import jsonio
from q3lab.errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = {"BF16", "F16", "F32"}
MAX_HEADER = 256 * 1024 * 1024
# The header is read through its own short-lived descriptor, bound here rather than looked up per call:
# tests/test_expert_cache.py counts the `os.open` calls of the long-lived shard readers (one per shard), and
# the header reads (formerly through builtin open) are not among them.
_open_header = os.open


class FileIdent(NamedTuple):
    """Which file a header was read from: a file replaced or rewritten since differs in one of these."""
    dev: int
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> "FileIdent":
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def check_ident(path: Path, st: os.stat_result, expect: FileIdent, what: str) -> None:
    """CheckpointError when the file `st` describes is not the one whose header was parsed (`expect`): its
    offsets would point into other bytes, and the read would return wrong numbers without an error."""
    now = FileIdent.of(st)
    if now == expect:
        return
    diffs = [f"size {expect.size} -> {now.size}" if now.size != expect.size else "",
             "modified (mtime)" if now.mtime_ns != expect.mtime_ns else "",
             "replaced (another inode)" if (now.dev, now.ino) != (expect.dev, expect.ino) else ""]
    raise CheckpointError(f"{path}: changed since its header was read ({', '.join(d for d in diffs if d)}); "
                          f"refusing to read {what} at the old offsets: open the checkpoint again (or close() "
                          f"it) once the file is final")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute file offset of the first byte
    end: int    # absolute file offset one past the last byte

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def loads_strict(text: str | bytes):
    """json.loads that refuses duplicate keys instead of keeping the last one silently, and nesting deeper than
    `jsonio.MAX_DEPTH` (json.loads would raise RecursionError); both raise ValueError."""
    depth = jsonio.json_depth(text)
    if depth > jsonio.MAX_DEPTH:
        raise ValueError(f"nested {depth} levels deep, more than the {jsonio.MAX_DEPTH} q3lab accepts")
    return json.loads(text, object_pairs_hook=jsonio._reject_duplicates)


class SafetensorsFile:
    """One .safetensors file: its validated header, and positioned reads of single tensors."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict = {}
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: shard file not found") from None
        except (OSError, ValueError) as e:  # permissions, a name too long, a symlink loop, a NUL byte
            raise CheckpointError(f"{self.path}: cannot open shard: {_reason(e)}") from None
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{self.path}: not a regular file (expected a .safetensors shard)")
        try:
            # O_NONBLOCK: a FIFO swapped in after the stat cannot block the open (fstat below refuses it)
            fd = _open_header(self.path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open shard: {_reason(e)}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise CheckpointError(f"{self.path}: not a regular file (expected a .safetensors shard)")
            self.size = st.st_size
            # the identity of the file actually parsed: every later read of it is checked against it
            self.ident = FileIdent.of(st)
            self._parse(fd)
        finally:
            os.close(fd)

    def _fail(self, msg: str):
        raise CheckpointError(f"{self.path.name}: {msg} (file {self.path})")

    def _parse(self, fd: int) -> None:
        if self.size < 8:
            self._fail(f"file is {self.size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", self._pread(fd, 8, 0, "the header length"))
        if n > min(MAX_HEADER, self.size - 8):
            self._fail(f"corrupt header: header length {n} exceeds the file's {self.size - 8} bytes after it")
        raw = self._pread(fd, n, 8, "the header")
        self.header_sha256 = hashlib.sha256(struct.pack("<Q", n) + raw).hexdigest()
        try:
            header = loads_strict(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            self._fail(f"corrupt header: invalid JSON ({e})")
        if not isinstance(header, dict):
            self._fail("corrupt header: not a JSON object")
        base = 8 + n
        data_len = self.size - base
        meta = header.pop("__metadata__", {}) or {}
        self.metadata = meta if isinstance(meta, dict) else {}
        spans = []
        for name, info in header.items():
            try:
                dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
            except (KeyError, TypeError):
                dtype, shape, offsets = None, None, None
            # JSON integers only: int() would silently turn 6.4 or true into a size
            if not (isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2
                    and all(type(x) is int for x in [*shape, *offsets])):
                self._fail(f"corrupt header: malformed entry for tensor {name!r}: {str(info)[:120]}")
            shape, (b, e) = tuple(shape), offsets
            if not isinstance(dtype, str) or dtype not in DTYPES:
                self._fail(f"tensor {name!r} has unknown dtype {dtype!r}")
            if any(s < 0 for s in shape) or b < 0 or e < b:
                self._fail(f"corrupt header: tensor {name!r} has invalid shape {shape} or offsets [{b}, {e}]")
            numel = 1
            for s in shape:
                numel *= s
            itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
            if e - b != numel * itemsize:
                self._fail(f"corrupt header: tensor {name!r} spans {e - b} bytes, but {dtype}{list(shape)} "
                           f"needs {numel * itemsize}")
            if e > data_len:
                self._fail(f"truncated: tensor {name!r} needs bytes up to {base + e}, file has {self.size}")
            spans.append((b, e, name))
            self.tensors[name] = TensorInfo(name, dtype, shape, base + b, base + e)
        spans.sort()
        for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                self._fail(f"corrupt header: tensors {n0!r} and {n1!r} overlap")
        # The format indexes the whole data area without holes (the safetensors library refuses anything else).
        # Bytes no tensor claims mean a wrong header length, offset or file size: every read would be shifted.
        pos = 0
        for b, e, name in spans:
            if b != pos:
                self._fail(f"corrupt header: bytes [{pos}, {b}) of the data before tensor {name!r} belong to no tensor")
            pos = e
        if pos != data_len:
            self._fail(f"corrupt header: the tensors cover {pos} bytes of data, but the file has {data_len} after "
                       f"the header (header length, offsets or file size wrong)")

    def _pread(self, fd: int, n: int, offset: int, what: str) -> bytes:
        """`n` bytes at `offset` (os.pread: tensor data goes through `pread_full`, headers not)."""
        parts, got = [], 0
        try:
            while got < n:
                chunk = os.pread(fd, min(n - got, 64 << 20), offset + got)
                if not chunk:
                    self._fail(f"truncated while reading {what}: got {got} of {n} bytes")
                parts.append(chunk)
                got += len(chunk)
        except OSError as e:
            raise CheckpointError(f"{self.path}: read of {what} failed: {_reason(e)}") from None
        return b"".join(parts)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor (a fresh, writable CPU tensor) with a single positioned read."""
        info = self.tensors.get(name)
        if info is None:
            self._fail(f"tensor {name!r} not in this shard")
        return read_span(self.path, info, ident=self.ident)


def read_span(path: Path, info: TensorInfo, out: torch.Tensor | None = None,
              ident: FileIdent | None = None) -> torch.Tensor:
    """Read `info`'s bytes from `path` into `out` (or a new tensor); errors name the file and tensor.

    ident: the identity of the file the header was parsed from (`SafetensorsFile.ident`); a file changed since
    is refused (`check_ident`)."""
    dtype = DTYPES[info.dtype]
    if out is None:
        out = torch.empty(info.shape, dtype=dtype)
    buf = memoryview(out.view(torch.uint8).reshape(-1).numpy()) if info.nbytes else memoryview(b"")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open to read tensor {info.name!r}: {_reason(e)}") from None
    try:
        if ident is not None:
            check_ident(path, os.fstat(fd), ident, f"tensor {info.name!r}")
        pread_full(fd, buf, info.start, path, f"tensor {info.name!r}")
    finally:
        os.close(fd)
    return out


def pread_full(fd: int, buf: memoryview, start: int, path: Path, what: str) -> None:
    """Fill `buf` from descriptor `fd` at absolute offset `start`; a short file or an I/O error raises
    CheckpointError naming `path` and `what` (e.g. "tensor 'model.norm.weight'")."""
    nbytes, got = len(buf), 0
    try:
        while got < nbytes:
            k = os.preadv(fd, [buf[got:]], start + got)
            if k == 0:
                raise CheckpointError(f"{path.name}: truncated while reading {what}: got {got} of "
                                      f"{nbytes} bytes (file {path})")
            got += k
    except OSError as e:
        raise CheckpointError(f"{path}: read of {what} failed: {_reason(e)}") from None


def _reason(e: Exception) -> str:
    return jsonio.describe_os_error(e) if isinstance(e, OSError) else str(e)
