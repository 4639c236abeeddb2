"""Corpus readers: a text file, a folder of text files, JSONL, or Parquet with a `text` column.

Every reader yields `Document(doc_id, text, domain)` in a fixed order (the order the plan numbers them):
    *.txt / other text file   one document per file; doc_id = the file's path relative to the corpus root
    folder                    every regular file below it (sorted by relative path), each read by its suffix
    *.jsonl                   one document per line: `text` (required), optional `id` and `domain`;
                              doc_id = `id` (as a string) or "NAME:LINE"
    *.parquet                 one document per row of the `text` column, optional `id` / `domain` columns;
                              doc_id = `id` or "NAME:ROW"
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from q3lab.errors import InputError


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str
    domain: str | None = None


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted((p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")),
                       key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise InputError(f"{path}: the corpus folder holds no files")
        return files
    raise InputError(f"{path}: no such corpus file or folder")


def corpus_sha256(path: str | Path) -> str:
    """sha256 over the corpus files' relative names and bytes (the manifest's corpus hash)."""
    root = Path(path)
    h = hashlib.sha256()
    for f in _files(root):
        h.update((f.relative_to(root).as_posix() if root.is_dir() else f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def _jsonl(f: Path, name: str) -> Iterator[Document]:
    with open(f, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise InputError(f"{f}:{n}: not a JSON object: {e}") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise InputError(f"{f}:{n}: expected an object with a string 'text', got {line[:80]!r}")
            dom = obj.get("domain")
            yield Document(str(obj["id"]) if "id" in obj else f"{name}:{n}", obj["text"],
                           None if dom is None else str(dom))


def _parquet(f: Path, name: str) -> Iterator[Document]:
    import pyarrow.parquet as pq
    pf = pq.ParquetFile(f)
    cols = set(pf.schema_arrow.names)
    if "text" not in cols:
        raise InputError(f"{f}: a Parquet corpus needs a 'text' column (found {sorted(cols)[:10]})")
    want = ["text"] + [c for c in ("id", "domain") if c in cols]
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=want):
        d = batch.to_pydict()
        for i, text in enumerate(d["text"]):
            row += 1
            if not isinstance(text, str):
                raise InputError(f"{f}: row {row - 1}: 'text' is {type(text).__name__}, not a string")
            ident = d["id"][i] if "id" in d and d["id"][i] is not None else f"{name}:{row - 1}"
            dom = d["domain"][i] if "domain" in d else None
            yield Document(str(ident), text, None if dom is None else str(dom))


def read_corpus(path: str | Path) -> Iterator[Document]:
    """The documents of a corpus path, in plan order (see the module docstring)."""
    root = Path(path)
    for f in _files(root):
        name = f.relative_to(root).as_posix() if root.is_dir() else f.name
        suffix = f.suffix.lower()
        if suffix == ".jsonl":
            yield from _jsonl(f, name)
        elif suffix in (".parquet", ".pq"):
            yield from _parquet(f, name)
        else:
            try:
                text = f.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{f}: not UTF-8 text ({e})") from None
            yield Document(name, text, None)
