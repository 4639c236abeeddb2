"""Helpers for the fault-injection tests: break a checkpoint in one precise way, snapshot folders, run the CLI."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any, Callable

from q3lab.cli import main

INDEX = "model.safetensors.index.json"


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (relative path -> digest): equal before and after = nothing damaged."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def index(path: Path) -> dict[str, Any]:
    return json.loads((path / INDEX).read_text())


def write_index(path: Path, data: dict[str, Any]) -> None:
    (path / INDEX).write_text(json.dumps(data, indent=2))


def shard_of(path: Path, key: str) -> str:
    return index(path)["weight_map"][key]


def read_shard(file: Path) -> tuple[dict[str, Any], bytes]:
    """(header dict, data bytes) of a safetensors file, parsed without q3lab (the code under test)."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_shard(file: Path, header: dict[str, Any] | str, data: bytes) -> None:
    text = header if isinstance(header, str) else json.dumps(header)
    raw = text.encode()
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def edit_header(file: Path, fn: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite a shard with `fn` applied to its header; the data bytes stay as they were."""
    header, data = read_shard(file)
    fn(header)
    write_shard(file, header, data)


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run `q3lab ARGV` in-process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def repack_shard(file: Path, fn: Callable[[list[list]], list[list]]) -> None:
    """Rewrite a shard from `fn(entries)`, entries being [key, dtype, shape, raw bytes] in file order; the data is
    packed back to back, as a tool that wrote the shard this way would have done (no gaps)."""
    header, data = read_shard(file)
    meta = header.pop("__metadata__", None)
    entries = [[k, v["dtype"], v["shape"], data[v["data_offsets"][0]:v["data_offsets"][1]]]
               for k, v in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])]
    new: dict[str, Any] = {"__metadata__": meta} if meta is not None else {}
    blobs, off = [], 0
    for key, dtype, shape, blob in fn(entries):
        new[key] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(blob)]}
        blobs.append(blob)
        off += len(blob)
    write_shard(file, new, b"".join(blobs))


def tmp_files(folder: Path) -> list[str]:
    """Partial files a writer left behind (`*.tmp`)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.tmp"))


def bytes_in(folder: Path) -> int:
    """Bytes of every file under `folder` now (files may vanish while we look: a writer renames them)."""
    total = 0
    stack = [folder]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    try:
                        if e.is_dir(follow_symlinks=False):
                            stack.append(Path(e.path))
                        else:
                            total += e.stat(follow_symlinks=False).st_size
                    except FileNotFoundError:
                        pass
        except FileNotFoundError:
            pass
    return total


def inodes(folder: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every file: unchanged = the file was kept, not rewritten."""
    return {p.relative_to(folder).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}
