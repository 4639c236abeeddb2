"""Synthetic routing datasets with the real schema, for tests and benchmarks of the analyses at scale.

Routing is made cheaply but not uniformly: each token either keeps the previous token's experts in a layer
(probability `persistence`) or draws A distinct experts as `(base + j * step) mod E` (base skewed towards
low ids, step odd: distinct for E a power of two), so that load, overlap and reuse differ from the uniform
baseline in known directions.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from q3lab.errors import InputError
from q3lab.atlas.dataset import FORMAT, DatasetWriter, routing_table
from q3lab.atlas.tracing import plan_parts


def synthetic_dataset(out: str | Path, tokens: int, *, layers: int = 48, top_k: int = 8, experts: int = 128,
                      doc_tokens: int = 2048, part_tokens: int = 262144, persistence: float = 0.3,
                      vocab: int = 152064, domains: tuple[str, ...] = ("code", "math", "prose"),
                      seed: int = 0, progress: bool = False) -> Path:
    """Write a dataset of `tokens` tokens in documents of `doc_tokens` (a fixture for the memory bound)."""
    if experts & (experts - 1) or top_k > experts:
        raise InputError(f"synthetic_dataset: experts must be a power of two >= top_k, got {experts}, {top_k}")
    from tqdm.auto import tqdm
    ndocs = -(-tokens // doc_tokens)
    lengths = [min(doc_tokens, tokens - i * doc_tokens) for i in range(ndocs)]
    parts = plan_parts(lengths, part_tokens)
    manifest = {"format": FORMAT, "synthetic": {"seed": seed, "persistence": persistence},
                "config": {"num_layers": layers, "top_k": top_k, "num_experts": experts, "vocab_size": vocab},
                "corpus": {"documents": ndocs, "tokens": tokens},
                "options": {"doc_tokens": doc_tokens, "part_tokens": part_tokens},
                "columns": ["doc_id", "token_index", "token", "domain", "modality", "experts", "weights"],
                "parts": [{"name": p.name, "first": p.first, "end": p.end, "tokens": p.tokens} for p in parts]}
    writer = DatasetWriter(out, manifest)
    L, A, E = layers, top_k, experts
    j = np.arange(A)
    for p in tqdm(parts, disable=not progress, desc="synthetic parts"):
        if writer.is_complete(p.name):
            continue
        rng = np.random.default_rng([seed, p.first])
        n = p.tokens
        base = (rng.random((n, L)) ** 2 * E).astype(np.int64)                        # skewed to low ids
        step = 2 * rng.integers(0, E // 2, (n, L)) + 1
        ex = (base[:, :, None] + j * step[:, :, None]) % E                            # [n, L, A] distinct
        keep = rng.random((n, L)) < persistence
        doc_idx = np.repeat(np.arange(p.first, p.end), [lengths[d] for d in range(p.first, p.end)])
        ti = np.concatenate([np.arange(lengths[d]) for d in range(p.first, p.end)]).astype(np.int32)
        keep[ti == 0] = False
        # a kept token copies its predecessor's experts: forward-fill the index of the last fresh row
        src = np.where(keep, -1, np.arange(n)[:, None])
        src = np.maximum.accumulate(src, axis=0)
        ex = np.take_along_axis(ex, src[:, :, None], axis=0)
        w = rng.random((n, L, A)).astype(np.float32) + 0.05
        w = -np.sort(-w / w.sum(-1, keepdims=True), axis=-1)                          # rank order
        tok = (rng.zipf(1.3, n) % vocab).astype(np.int32)
        doc_ids = [f"doc{d}" for d in doc_idx]
        doms = [domains[d % len(domains)] for d in doc_idx]
        writer.write_part(p.name, routing_table(doc_ids, ti, tok, doms, ex.reshape(n, -1), w.reshape(n, -1), L, A))
    return Path(out)
