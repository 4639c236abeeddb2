"""One entry point for weights: an extracted store or a Hugging Face checkpoint folder."""
from __future__ import annotations

from pathlib import Path

from .checkpoint import INDEX, SINGLE, Checkpoint
from .errors import StoreError
from .store import DENSE, MANIFEST, PROGRESS, Store


def open_weights(path: str | Path) -> Store | Checkpoint:
    """A `Store` if `path` holds manifest.json, a `Checkpoint` otherwise.

    A folder with an extraction journal but no manifest is an interrupted extraction: `StoreError`, never
    a silent attempt to read it as a checkpoint.
    """
    path = Path(path)
    if (path / MANIFEST).exists():
        return Store.open(path)
    if (path / PROGRESS).exists():
        raise StoreError(f"{path}: incomplete extraction ({PROGRESS} but no {MANIFEST}), rerun q3lab extract")
    if (path / DENSE).exists() and not (path / INDEX).exists() and not (path / SINGLE).exists():
        raise StoreError(f"{path}: holds {DENSE} but no {MANIFEST}: a damaged q3lab store (extract it again)")
    return Checkpoint.open(path)
