"""Bounded reading of the small files q3lab parses: configs, indexes, tokenizer files, manifests, journals,
prompt files and trace headers.

Every such read from disk goes through `read_bytes` / `read_text` / `read_json`, so that what the environment
can do to a file ends in the caller's `Q3LabError` subclass naming the path, never in a hang, an exhausted
memory or a raw `OSError`:

- only a regular file is read: a FIFO would block forever and a device such as /dev/zero never ends. The path
  is stat-ed before it is opened, opened with O_NONBLOCK (a FIFO swapped in between cannot block the open),
  and the open descriptor is checked again;
- at most `CAPS[kind]` bytes are read (a few times the largest real file of that kind);
- JSON nesting is bounded: `check_depth` scans the bracket depth outside strings in linear time before
  `json.loads` (which would recurse out at about 1,000 levels), refusing more than `MAX_DEPTH`;
- bytes must be UTF-8, and JSON objects may not repeat a key (a lenient parser keeps the last one silently).
"""
from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np

from q3lab.errors import Q3LabError

MiB = 1 << 20
# Largest file of each kind q3lab reads whole. The real checkpoint's are far below: config.json 13 KB, the
# index 2.9 MB, tokenizer.json 11 MB, tokenizer_config.json 8 KB, a full store's manifest and journal ~5 MB.
CAPS: dict[str, int] = {
    "config": 16 * MiB,
    "index": 64 * MiB,
    "tokenizer": 128 * MiB,          # tokenizer.json, vocab.json, merges.txt
    "tokenizer_config": 16 * MiB,
    "manifest": 64 * MiB,
    "journal": 64 * MiB,
    "prompts": 256 * MiB,
    "trace": 16 * MiB,               # a CSV trace's first (JSON) line
    "json": 16 * MiB,                # anything else
}
# Deepest JSON nesting accepted. Real files nest at most 6 levels (tokenizer.json); json.loads and every
# recursive walk of the result (repr, json.dumps) would raise RecursionError near 1,000.
MAX_DEPTH = 100

_TYPES = [(stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")]
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'[]{}"')


def describe_os_error(e: OSError) -> str:
    """The reason of an OSError without its path ("Permission denied", "File name too long")."""
    return e.strerror or (errno.errorcode.get(e.errno, "") if e.errno else "") or str(e) or type(e).__name__


def _kind_of(mode: int) -> str:
    return next((what for test, what in _TYPES if test(mode)), "not a regular file")


def read_bytes(path: str | Path, error: type[Q3LabError], *, kind: str = "json", cap: int | None = None,
               missing: str = "file not found") -> bytes:
    """The bytes of the regular file `path`, at most `cap` (default `CAPS[kind]`); anything else raises `error`
    naming the path: missing (`missing` says how), not a regular file, too large, unreadable."""
    path = Path(path)
    cap = CAPS[kind] if cap is None else cap
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    except OSError as e:
        raise error(f"{path}: cannot read: {describe_os_error(e)}") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path}: {_kind_of(st.st_mode)}, expected a regular {kind} file")
    if st.st_size > cap:
        raise error(f"{path}: {st.st_size:,} bytes, more than the {cap:,} q3lab reads from a {kind} file")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    except OSError as e:
        raise error(f"{path}: cannot read: {describe_os_error(e)}") from None
    try:
        st = os.fstat(fd)   # the file actually opened: the path may have been swapped since the stat
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{path}: {_kind_of(st.st_mode)}, expected a regular {kind} file")
        chunks, got = [], 0
        while got <= cap:   # a file growing while we read stops at the cap too
            chunk = os.read(fd, min(cap + 1 - got, 16 * MiB))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    except OSError as e:
        raise error(f"{path}: cannot read: {describe_os_error(e)}") from None
    finally:
        os.close(fd)
    if got > cap:
        raise error(f"{path}: more than the {cap:,} bytes q3lab reads from a {kind} file (it grew while read)")
    return b"".join(chunks)


def decode_utf8(raw: bytes, where: str, error: type[Q3LabError]) -> str:
    """`raw` as UTF-8 text; bytes that are not UTF-8 raise `error` naming `where` and the offset."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{where}: not UTF-8 text: byte {raw[e.start:e.start + 1]!r} at offset {e.start} "
                    f"({e.reason})") from None


def read_text(path: str | Path, error: type[Q3LabError], *, kind: str = "json", cap: int | None = None,
              missing: str = "file not found") -> str:
    """The UTF-8 text of the regular file `path` (see `read_bytes`); other encodings raise `error`."""
    return decode_utf8(read_bytes(path, error, kind=kind, cap=cap, missing=missing), str(path), error)


def json_depth(raw: bytes | str) -> int:
    """Deepest bracket nesting of a JSON text outside its strings, in linear time, without parsing it.

    Escapes go first: a run of backslashes loses its pairs left to right (JSON's own reading), so a quote still
    preceded by a backslash is escaped, and goes too. Then only brackets and quotes are kept, and the parts
    between pairs of quotes (the strings) dropped. Text that is not valid JSON may get a wrong depth after its
    first error, which is where json.loads stops anyway.
    """
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    kept = raw.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_STRUCTURE)
    brackets = b"".join(kept.split(b'"')[0::2])
    if not brackets:
        return 0
    b = np.frombuffer(brackets, np.uint8)
    steps = np.where((b == ord("[")) | (b == ord("{")), 1, -1).astype(np.int32)
    return int(np.cumsum(steps).max())


def _reject_duplicates(pairs):
    seen = {}
    for k, v in pairs:
        if k in seen:
            raise ValueError(f"duplicate key {k!r}")
        seen[k] = v
    return seen


def loads(text: str | bytes, where: str, error: type[Q3LabError], *, what: str = "JSON",
          max_depth: int = MAX_DEPTH, duplicates: bool = False) -> Any:
    """Parse JSON text with bounded nesting, refusing repeated keys unless `duplicates`; errors raise `error`
    as `<where>: invalid <what>: <reason>`."""
    if isinstance(text, bytes):
        text = decode_utf8(text, where, error)
    depth = json_depth(text)
    if depth > max_depth:
        raise error(f"{where}: invalid {what}: nested {depth} levels deep, more than the {max_depth} q3lab accepts")
    try:
        return json.loads(text) if duplicates else json.loads(text, object_pairs_hook=_reject_duplicates)
    except RecursionError:  # unreachable after the depth check; kept so that no recursion can escape
        raise error(f"{where}: invalid {what}: nested too deep") from None
    except ValueError as e:
        raise error(f"{where}: invalid {what}: {e}") from None


def read_json(path: str | Path, error: type[Q3LabError], *, kind: str = "json", what: str = "JSON",
              missing: str = "file not found") -> Any:
    """Read and parse the JSON file `path` within the bounds above (regular file, `CAPS[kind]` bytes, UTF-8,
    `MAX_DEPTH` levels, no repeated keys); every failure raises `error` naming the path."""
    return loads(read_text(path, error, kind=kind, missing=missing), str(path), error, what=what)


def read_json_object(path: str | Path, error: type[Q3LabError], *, kind: str = "json",
                     what: str = "JSON") -> dict[str, Any]:
    """`read_json` of a file that must hold a JSON object."""
    obj = read_json(path, error, kind=kind, what=what)
    if not isinstance(obj, dict):
        raise error(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def exists(path: str | Path, error: type[Q3LabError]) -> bool:
    """Whether `path` exists (following symlinks). Unlike `Path.exists`, which raises a raw PermissionError or
    'File name too long', any answer other than "there" or "not there" raises `error` naming the path."""
    try:
        os.stat(path)
        return True
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as e:
        raise error(f"{path}: cannot read: {describe_os_error(e)}") from None
    except ValueError as e:  # an embedded NUL byte
        raise error(f"{path!r}: not a valid path: {e}") from None
