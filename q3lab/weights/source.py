"""The one way in to weights: `open_source` opens a Hugging Face checkpoint folder or an extracted store and
applies the soundness gate. `q3lab.load`, the notebooks, `q3lab.extract` and the transformers oracle all
open through it; `WeightSource` is what they get.
"""
from __future__ import annotations

import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from q3lab.weights.checkpoint import INDEX, SINGLE, AuditReport, Checkpoint, audit_checkpoint
from q3lab.base.config import ThinkerConfig
from q3lab.errors import CheckpointError, StoreError
from q3lab.weights.store import DENSE, MANIFEST, PROGRESS, Store


@runtime_checkable
class WeightSource(Protocol):
    """What every reader of weights offers (`Checkpoint`, `Store`): canonical tensors by name, and one expert's
    three matrices in one call."""

    path: Path
    config: ThinkerConfig

    def get(self, name: str) -> torch.Tensor:
        """A canonical tensor (`model.layers.{i}...`, `lm_head.weight`), dtype as stored."""

    def expert(self, layer: int, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Expert e of a layer: gate [I, D], up [I, D], down [D, I]."""

    def expert_into(self, layer: int, e: int, out: torch.Tensor | None) -> tuple[torch.Tensor, tuple] | None:
        """The expert's bytes read into a reusable byte buffer, and where each matrix is in it."""

    @property
    def tokenizer_dir(self) -> Path | None:
        """The folder holding the tokenizer files, if any."""

    def close(self) -> None:
        """Close open files (a later read opens them again)."""


# A checkpoint is audited once per object, however many callers open it (q3lab.load, then the oracle, ...).
_AUDITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def open_source(source: str | Path | WeightSource, *, audit: bool = True,
                allow_missing: Iterable[str] = ()) -> WeightSource:
    """A `Store` if `source` holds manifest.json, a `Checkpoint` otherwise; an open source is returned as is.

    audit: a checkpoint must pass `q3lab.audit` (every tensor config.json implies, in its shard, with its shape
        and dtype, no shard error): a dtype other than config.json's or a tensor in two shards reads without
        error, so only the audit sees it. `CheckpointError` with the problems otherwise. A store was checked
        against its manifest when it was opened. allow_missing: exact canonical names that may be missing
        (ablations). audit=False is for tools that report on a folder whatever its state.
    A folder with an extraction journal but no manifest is an interrupted extraction: `StoreError`, never a
    silent attempt to read it as a checkpoint.
    """
    if isinstance(source, WeightSource):
        src = source
    else:
        path = Path(source)
        if (path / MANIFEST).exists():
            src = Store.open(path)
        elif (path / PROGRESS).exists():
            raise StoreError(f"{path}: incomplete extraction ({PROGRESS} but no {MANIFEST}), rerun q3lab extract")
        elif (path / DENSE).exists() and not (path / INDEX).exists() and not (path / SINGLE).exists():
            raise StoreError(f"{path}: holds {DENSE} but no {MANIFEST}: a damaged q3lab store (extract it again)")
        else:
            src = Checkpoint.open(path)
    if audit and isinstance(src, Checkpoint):
        _refuse_failed_audit(src, set(allow_missing))
    return src


def open_weights(path: str | Path | WeightSource) -> WeightSource:
    """`open_source(path, audit=False)`: kept for `q3lab.open_weights`."""
    return open_source(path, audit=False)


def _refuse_failed_audit(ckpt: Checkpoint, allowed: set[str]) -> None:
    report = _AUDITS.get(ckpt)
    if report is None:
        report = _AUDITS[ckpt] = audit_checkpoint(ckpt)
    probs = report.problems()
    probs = probs[~((probs["status"] == "missing") & probs["name"].isin(allowed))]
    if len(probs) or report.errors:
        raise CheckpointError(audit_failure(report, probs))


def audit_failure(report: AuditReport, problems=None) -> str:
    """The gate's message: what failed, tensor by tensor (40 at most) and shard by shard."""
    probs = report.problems() if problems is None else problems
    lines = [f"audit of {report.path} failed: {len(probs)} tensor problem(s), {len(report.errors)} shard "
             f"error(s); refusing to open it (`q3lab audit {report.path}` prints the full report)"]
    lines += [f"  {r['status']}: {r['key']}  [{r['detail']}]" for _, r in probs.head(40).iterrows()]
    if len(probs) > 40:
        lines.append(f"  ... and {len(probs) - 40} more")
    lines += [f"  shard error: {e}" for e in report.errors[:40]]
    if len(report.errors) > 40:
        lines.append(f"  ... and {len(report.errors) - 40} more shard errors")
    lines.append("FAILED: the thinker text model is incomplete or inconsistent")
    return "\n".join(lines)
