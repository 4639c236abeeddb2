"""Non-finite numbers (nan, inf): found in stored weights before a run, and stopped during one.

- `tensor_stats` / `deep_audit` (`q3lab audit --deep`): every thinker tensor of a checkpoint streamed chunk by
  chunk (memory bounded by one chunk), with min, max, mean, std of its finite values and its nan/inf counts.
- `check_logits` (called by `Thinker.generate` and `q3lab trace`): a cheap `isfinite(logits).all()`; when it
  fails, `first_nonfinite` re-runs an eager forward of the same tokens with hooks on the model's hook points
  and `NonFiniteError` names the first layer and component where nan/inf appeared. Without this, greedy
  decoding of nan logits prints token 0 over and over and exits 0.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator

import pandas as pd
import torch

from q3lab.errors import Q3LabError

STATS_COLUMNS = ("numel", "nan", "inf", "min", "max", "mean", "std")
_CHUNK_BYTES = 4 << 20   # per read: peak memory about 25x this (float64 moments), whatever the tensor size


class NonFiniteError(Q3LabError):
    """nan or inf in a model's activations or logits (the message names the first layer and component)."""


# -- stored tensors --------------------------------------------------------------------------------
class _Moments:
    """Streaming count / nan / inf / min / max / mean / M2 of the finite values (Chan et al.'s merge)."""

    def __init__(self) -> None:
        self.n = self.nan = self.inf = 0
        self.mean = self.m2 = 0.0
        self.lo, self.hi = math.inf, -math.inf

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1)
        finite = torch.isfinite(x)
        all_finite = bool(finite.all())
        if not all_finite:
            nan = int(torch.isnan(x).sum())
            self.nan += nan
            self.inf += x.numel() - int(finite.sum()) - nan
        v = (x if all_finite else x[finite]).double()
        k = v.numel()
        if not k:
            return
        mean = float(v.mean())
        m2 = float(((v - mean) ** 2).sum())
        d, n = mean - self.mean, self.n + k
        self.mean += d * k / n
        self.m2 += m2 + d * d * self.n * k / n
        self.n = n
        self.lo, self.hi = min(self.lo, float(v.min())), max(self.hi, float(v.max()))

    def row(self, numel: int) -> dict[str, Any]:
        empty = self.n == 0
        return dict(numel=numel, nan=self.nan, inf=self.inf, min=math.nan if empty else self.lo,
                    max=math.nan if empty else self.hi, mean=math.nan if empty else self.mean,
                    std=math.nan if empty else math.sqrt(self.m2 / self.n))


def tensor_stats(ckpt, *, keys: list[tuple[str, str]] | None = None, progress: bool = True) -> pd.DataFrame:
    """Per-tensor statistics of a `Checkpoint`: one row per (key, shard) with columns key, shard, dtype and
    `STATS_COLUMNS` (min/max/mean/std over the finite values; nan and inf counts). Tensors are read one chunk
    at a time (`_CHUNK_BYTES`), each read checked against the identity of the shard its header came from.

    keys: (source key, shard) pairs; default every readable thinker-text tensor the audit lists.
    """
    from tqdm.auto import tqdm

    from q3lab.base.safetensors_io import DTYPES, TensorInfo, read_span
    if keys is None:
        from q3lab.weights.checkpoint import audit_checkpoint
        frame = audit_checkpoint(ckpt).frame
        frame = frame[frame["status"].isin(["ok", "dtype", "shape", "unexpected"]) & (frame["shard"] != "")]
        keys = list(zip(frame["key"], frame["shard"]))
    infos = [(key, shard, ckpt.file(shard)) for key, shard in keys]
    infos = [(key, shard, f, f.tensors[key]) for key, shard, f in infos if key in f.tensors]
    rows = []
    bar = tqdm(total=sum(i.nbytes for *_, i in infos), unit="B", unit_scale=True, unit_divisor=1024,
               desc="audit --deep", disable=not progress)
    try:
        for key, shard, f, info in infos:
            numel = math.prod(info.shape)
            if info.dtype not in ("BF16", "F16", "F32", "F64"):
                rows.append(dict(key=key, shard=shard, dtype=info.dtype, **_Moments().row(numel)))
                bar.update(info.nbytes)
                continue
            item = torch.empty((), dtype=DTYPES[info.dtype]).element_size()
            step = max(1, _CHUNK_BYTES // item)
            buf = torch.empty(min(step, numel), dtype=DTYPES[info.dtype])
            m = _Moments()
            for i in range(0, numel, step):
                k = min(step, numel - i)
                part = TensorInfo(key, info.dtype, (k,), info.start + i * item, info.start + (i + k) * item)
                m.add(read_span(f.path, part, out=buf[:k], ident=f.ident).float())
                bar.update(k * item)
            rows.append(dict(key=key, shard=shard, dtype=info.dtype, **m.row(numel)))
    finally:
        bar.close()
    return pd.DataFrame(rows, columns=["key", "shard", "dtype", *STATS_COLUMNS])


def nonfinite_lines(stats: pd.DataFrame, limit: int = 40) -> list[str]:
    """One line per tensor holding nan or inf (what `q3lab audit --deep` prints and fails on)."""
    bad = stats[(stats["nan"] > 0) | (stats["inf"] > 0)]
    lines = [f"  {r['key']} in {r['shard']}: {int(r['nan'])} nan, {int(r['inf'])} inf of {int(r['numel'])}"
             for _, r in bad.head(limit).iterrows()]
    if len(bad) > limit:
        lines.append(f"  ... and {len(bad) - limit} more")
    return lines


# -- activations -----------------------------------------------------------------------------------
class _Found(Exception):
    pass


_diagnosing = [False]   # the eager re-run must not trigger the checks it serves


def first_nonfinite(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                    ) -> tuple[str, int | None, int | None] | None:
    """Re-run an eager forward of `input_ids` (no cache) and return where nan/inf first appear: (component,
    layer or None, token index or None); None when the re-run stays finite. Components, in execution order:
    "embedding", then per layer "attention output", "MoE output", "residual stream", then "final norm" and
    "lm_head (logits)"."""
    points = [("embedding", None, model.model.hook_embed)]
    for i, layer in enumerate(model.model.layers):
        points += [("attention output", i, layer.hook_attn_out), ("MoE output", i, layer.hook_mlp_out),
                   ("residual stream", i, layer.hook_resid_post)]
    points.append(("final norm", None, model.model.hook_final_norm))
    found: list = []

    def hook_for(name: str, layer: int | None):
        def hook(module, args, out):
            if not bool(torch.isfinite(out).all()):
                bad = (~torch.isfinite(out)).nonzero()
                found.append((name, layer, int(bad[0, 1]) if out.dim() == 3 else None))
                raise _Found
        return hook
    handles = [p.register_forward_hook(hook_for(name, layer)) for name, layer, p in points]
    _diagnosing[0] = True
    try:
        with torch.inference_mode():
            logits = model(input_ids, attention_mask=attention_mask)
        if not bool(torch.isfinite(logits).all()):
            bad = (~torch.isfinite(logits)).nonzero()
            found.append(("lm_head (logits)", None, int(bad[0, 1])))
    except _Found:
        pass
    finally:
        _diagnosing[0] = False
        for h in handles:
            h.remove()
    return found[0] if found else None


def check_logits(model, logits: torch.Tensor, input_ids: torch.Tensor, *,
                 attention_mask: torch.Tensor | None = None, where: str = "generate") -> None:
    """Raise `NonFiniteError` naming the first non-finite layer when `logits` hold nan or inf (one cheap
    check when they do not). `input_ids`: every token the logits were computed from (the prompt, and what
    was generated so far)."""
    if _diagnosing[0] or bool(torch.isfinite(logits).all()):
        return
    diagnose(model, input_ids, attention_mask=attention_mask, where=where)


def diagnose(model, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
             where: str = "generate") -> None:
    """Raise `NonFiniteError` for logits known to hold nan/inf, naming where they first appear (`first_nonfinite`
    on `input_ids`, every token the logits were computed from)."""
    T = input_ids.shape[-1]
    hit = first_nonfinite(model, input_ids, attention_mask)
    if hit is None:
        raise NonFiniteError(f"{where}: the logits hold nan/inf, but an eager re-run of the {T} tokens stayed "
                             f"finite (a kernel or cache path differs from the eager one)")
    name, layer, token = hit
    at = f"layer {layer}'s {name}" if layer is not None else f"the {name}"
    tok = f" at token {token} of {T}" if token is not None else ""
    raise NonFiniteError(f"{where}: nan/inf values first appear in {at}{tok} ({model.dtype}); the weights "
                         f"there or the dtype's range are the likely cause: try q3lab audit --deep, or "
                         f"--dtype fp32")


@contextmanager
def guard(model) -> Iterator[None]:
    """Check the logits of every forward call of `model` that starts from an empty cache (a prompt) inside
    the block (`check_logits`); decode steps are checked by `Thinker.generate` itself."""
    def hook(module, args, kwargs, out):
        ids = args[0] if args else kwargs.get("input_ids")
        cache = args[2] if len(args) > 2 else kwargs.get("cache")
        if ids is None or (cache is not None and cache.length != ids.shape[-1]):
            return
        check_logits(module, out, ids, attention_mask=kwargs.get("attention_mask"), where="trace")
    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
