"""Trace a corpus: teacher-forced windows through `q3lab.record`, written as a resumable Parquet dataset.

Windows. A document of n <= window tokens is one forward of the whole document (so its routing is exactly
what `q3lab.record` gives around one forward of it). A longer document is traced in overlapping windows of
`window` tokens advancing by `stride` (default window // 2): the first window keeps all its tokens, every
later window [e - window, e) keeps only its last tokens [e_prev, e), each of which had at least
`window - stride` tokens of context. Each window is a fresh forward at window-local positions 0..T-1 (RoPE
is relative, so only the lost context matters, not the offset). What that does to routing: a kept token
past the first window sees its previous window - stride .. window tokens, not the whole document, and the
window's first token acts as the attention sink instead of the document's; tokens early in a window (the
ones with little context, whose routing differs most from full-context routing) are dropped, not kept.
Stride = window gives disjoint windows (cheapest, but tokens at a window start have no context).

Batches. Windows never mix parts: each part's windows are ordered by length (longest first, then document
order) and run `batch_size` at a time, right-padded with `attention_mask` (the Thinker's mask keeps real
tokens causal and blind to padding; `record` drops padded tokens). The batches therefore depend only on the
plan, never on ranks or on resuming, and every run of the same command gives bit-equal parts.

Sharding. Part p goes to rank p % world. `torchrun --nproc-per-node N -m q3lab trace ...` gives rank and
world from the environment (RANK, WORLD_SIZE; LOCAL_RANK picks the GPU); `--shard i/n` does the same in
independent processes. Every rank writes its own parts into the one folder; the dataset is their union.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from q3lab.errors import InputError
from q3lab.runtime.recording import record
from q3lab.atlas.corpus import corpus_sha256, read_corpus
from q3lab.atlas.dataset import FORMAT, DatasetWriter, logits_schema, open_dataset, part_name, routing_table, sha256_file

DEFAULT_PART_TOKENS = 65536


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, keep_from) of each window over a document of n tokens (see the module docstring)."""
    if window < 1 or not 1 <= stride <= window:
        raise InputError(f"trace: need window >= 1 and 1 <= stride <= window, got window {window}, "
                         f"stride {stride}")
    if n <= window:
        return [(0, n, 0)]
    out, e = [(0, window, 0)], window
    while e < n:
        e2 = min(e + stride, n)
        out.append((e2 - window, e2, e))
        e = e2
    return out


@dataclass
class PartPlan:
    name: str
    first: int       # first document index (reader order)
    end: int         # one past the last
    tokens: int      # tokens kept in this part


def plan_parts(lengths: list[int], part_tokens: int) -> list[PartPlan]:
    """Consecutive documents grouped into parts of about `part_tokens` tokens (a longer document alone)."""
    parts, first, acc = [], 0, 0
    for i, n in enumerate(lengths):
        acc += n
        if acc >= part_tokens:
            parts.append(PartPlan(part_name(first, i + 1), first, i + 1, acc))
            first, acc = i + 1, 0
    if first < len(lengths) and acc:
        parts.append(PartPlan(part_name(first, len(lengths)), first, len(lengths), acc))
    return parts


def _encode_corpus(corpus: str | Path, tokenizer, max_tokens: int | None):
    """Yield (index, doc, ids) in reader order, ids truncated so the total is at most max_tokens."""
    total = 0
    for i, doc in enumerate(read_corpus(corpus)):
        if max_tokens is not None and total >= max_tokens:
            return
        ids = tokenizer.encode(doc.text)
        if max_tokens is not None:
            ids = ids[:max_tokens - total]
        total += len(ids)
        yield i, doc, ids


def _tokenizer_sha256(tok_dir: Path | None) -> str | None:
    if tok_dir is None:
        return None
    h = hashlib.sha256()
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"):
        if (tok_dir / name).is_file():
            h.update(name.encode() + b"\0")
            sha256_file(tok_dir / name, h)
    return h.hexdigest()


def resolve_shard(shard: str | None) -> tuple[int, int, bool]:
    """(rank, world, distributed): from --shard i/n, else torchrun's RANK/WORLD_SIZE, else (0, 1)."""
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if shard is not None:
        try:
            i, n = (int(x) for x in shard.split("/"))
        except ValueError:
            raise InputError(f"--shard must be i/n (e.g. 0/4), got {shard!r}") from None
        if not 0 <= i < n:
            raise InputError(f"--shard {shard}: need 0 <= i < n")
        if env_world > 1:
            raise InputError(f"--shard {shard} given inside torchrun (WORLD_SIZE={env_world}): use one or the other")
        return i, n, False
    if env_world > 1:
        return int(os.environ["RANK"]), env_world, True
    return 0, 1, False


def trace_corpus(model, tokenizer, corpus: str | Path, out: str | Path, *, batch_size: int = 8,
                 window: int = 1024, stride: int | None = None, max_tokens: int | None = None,
                 logits: bool = False, rank: int = 0, world: int = 1, part_tokens: int = DEFAULT_PART_TOKENS,
                 progress: bool = True, checkpoint: str | None = None) -> dict[str, Any]:
    """Trace `corpus` into the dataset folder `out` (see the module docstring); resumes a partial run.

    Returns a summary: parts planned, parts written by this call, parts already complete, tokens traced by
    this call, seconds, tokens/s.
    """
    from tqdm.auto import tqdm
    stride = window // 2 if stride is None else stride
    windows(window + 1, window, max(stride, 1))         # validates window / stride
    if batch_size < 1:
        raise InputError(f"trace: --batch-size must be >= 1, got {batch_size}")
    if max_tokens is not None and max_tokens < 1:
        raise InputError(f"trace: --max-tokens must be >= 1, got {max_tokens}")
    if window > model.config.max_position_embeddings:
        raise InputError(f"trace: --window {window} exceeds the model's max_position_embeddings "
                         f"{model.config.max_position_embeddings}")
    cfg = model.config
    L, A, E = cfg.num_hidden_layers, cfg.num_experts_per_tok, cfg.num_experts
    if E > 256:
        raise InputError(f"trace: {E} experts do not fit the dataset's uint8 expert ids")
    lengths = [len(ids) for _, _, ids in _encode_corpus(corpus, tokenizer, max_tokens)]
    if not sum(lengths):
        raise InputError(f"{corpus}: the corpus gives no tokens")
    parts = plan_parts(lengths, part_tokens)
    tok_dir = getattr(getattr(model, "source", None), "tokenizer_dir", None)
    manifest = {
        "format": FORMAT,
        "config": {"num_layers": L, "top_k": A, "num_experts": E, "vocab_size": cfg.vocab_size,
                   "hidden_size": cfg.hidden_size,
                   "config_sha256": hashlib.sha256(json.dumps(dataclasses.asdict(cfg), sort_keys=True)
                                                   .encode()).hexdigest()},
        "checkpoint": {"tokenizer_sha256": _tokenizer_sha256(tok_dir)},
        "corpus": {"sha256": corpus_sha256(corpus), "documents": len(lengths), "tokens": int(sum(lengths))},
        # where the inputs were (not compared on resume: another node may mount them elsewhere)
        "provenance": {"checkpoint": None if checkpoint is None else str(checkpoint), "corpus": str(corpus)},
        "options": {"window": window, "stride": stride, "max_tokens": max_tokens, "batch_size": batch_size,
                    "dtype": str(model.dtype).replace("torch.", ""), "device_type": model.device.type,
                    "logits": bool(logits), "part_tokens": part_tokens, "positions": "window-local"},
        "columns": ["doc_id", "token_index", "token", "domain", "modality", "experts", "weights"],
        "parts": [{"name": p.name, "first": p.first, "end": p.end, "tokens": p.tokens} for p in parts],
    }
    writer = DatasetWriter(out, manifest)
    mine = [p for n, p in enumerate(parts) if n % world == rank]
    todo = [p for p in mine if not writer.is_complete(p.name)]
    summary = {"parts": len(parts), "rank": rank, "world": world, "mine": len(mine),
               "already_complete": len(mine) - len(todo), "written": 0, "tokens": 0}
    t0 = time.perf_counter()
    bar = tqdm(total=sum(p.tokens for p in todo), unit="tok", unit_scale=True, desc=f"trace r{rank}/{world}",
               disable=not progress, smoothing=0.1)
    by_first = {p.first: p for p in todo}
    current: PartPlan | None = None
    docs: list = []
    for i, doc, ids in _encode_corpus(corpus, tokenizer, max_tokens):
        if current is None and i in by_first:
            current, docs = by_first[i], []
        if current is None:
            continue
        docs.append((doc, ids))
        if i + 1 == current.end:
            table, lg = _trace_part(model, docs, window, stride, batch_size, logits, L, A, E)
            if table.num_rows != current.tokens:
                raise InputError(f"trace: part {current.name} gave {table.num_rows} tokens, planned "
                                 f"{current.tokens} (did the corpus change while tracing?)")
            writer.write_part(current.name, table, lg)
            summary["written"] += 1
            summary["tokens"] += table.num_rows
            bar.update(table.num_rows)
            current = None
    bar.close()
    secs = time.perf_counter() - t0
    summary.update(seconds=secs, tokens_per_s=summary["tokens"] / secs if secs > 0 else float("nan"))
    return summary


def _routing_arrays(rec, L: int, A: int) -> tuple[np.ndarray, np.ndarray]:
    """(experts int16, weights float32), each [tokens, L*A], of the recording's one forward call: rows in batch-row
    then token order with padding dropped, layer-major, rank order: `rec.to_frame()`'s expert and weight columns
    reshaped, without building the frame (a pandas frame of tokens x L x A rows costs more than the forward on a
    GPU)."""
    calls = rec._calls()
    if len(calls) != 1:
        raise InputError(f"trace: expected one recorded forward call per batch, got {len(calls)}")
    c = calls[0]
    B, T = c.ids.shape
    ex = torch.stack([c.topk_ids[i] for i in range(L)]).view(L, B, T, A).permute(1, 2, 0, 3)
    wt = torch.stack([c.topk_weights[i] for i in range(L)]).float().view(L, B, T, A).permute(1, 2, 0, 3)
    if c.valid is not None:
        ex, wt = ex[c.valid], wt[c.valid]
    return (ex.reshape(-1, L * A).to(torch.int16).cpu().numpy(), wt.reshape(-1, L * A).cpu().numpy())


def _modality_array(rec) -> np.ndarray:
    """The `modality` label of each token of the recording's one forward call, in `_routing_arrays`' row order
    (what `rec.to_frame()`'s modality column holds on each token's rows)."""
    from q3lab.omni.modality import modality_labels
    c = rec._calls()[0]
    labels = np.asarray(modality_labels(c.ids, rec.modality_tokens, media=c.media), dtype=object)
    labels = labels.reshape(c.ids.shape)
    if c.valid is not None:
        labels = labels[c.valid.cpu().numpy()]
    return labels.reshape(-1)


def _trace_part(model, docs, window: int, stride: int, batch_size: int, logits: bool, L: int, A: int,
                E: int) -> tuple[pa.Table, pa.Table | None]:
    """Routing of every kept token of the part's documents, in document then token order."""
    wins = []  # (doc number, start, end, keep_from)
    for d, (_, ids) in enumerate(docs):
        if ids:
            wins.extend((d, s, e, k) for s, e, k in windows(len(ids), window, stride))
    order = sorted(range(len(wins)), key=lambda w: (-(wins[w][2] - wins[w][1]), w))
    ex_out: dict[int, np.ndarray] = {}
    w_out: dict[int, np.ndarray] = {}
    m_out: dict[int, np.ndarray] = {}
    lg_out: dict[int, np.ndarray] = {}
    dev = model.device
    for b0 in range(0, len(order), batch_size):
        batch = order[b0:b0 + batch_size]
        rows = [docs[wins[w][0]][1][wins[w][1]:wins[w][2]] for w in batch]
        T = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), T), dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, :len(row)] = torch.tensor(row)
            mask[r, :len(row)] = 1
        padded = any(len(r) < T for r in rows)
        with record(model, probs=logits) as rec:
            for w in batch:
                rec.set_prompt(f"w{w}")
            with torch.inference_mode():
                model(ids.to(dev), attention_mask=mask.to(dev) if padded else None, last_only=True)
        ex, wt = _routing_arrays(rec, L, A)                      # [tokens of the batch, L*A], row order
        md = _modality_array(rec)                                # one label per token, the same order
        lp = None
        if logits:   # log-probabilities: the router logits less their per-token logsumexp
            lp = np.stack([np.log(rec.router_probs(layer)[1]) for layer in range(L)], axis=1).reshape(-1, L * E)
        off = 0
        for w, row in zip(batch, rows):
            n = len(row)
            keep = slice(wins[w][3] - wins[w][1], n)
            ex_out[w], w_out[w], m_out[w] = ex[off:off + n][keep], wt[off:off + n][keep], md[off:off + n][keep]
            if lp is not None:
                lg_out[w] = lp[off:off + n][keep]
            off += n
        if off != len(ex):
            raise InputError(f"trace: record gave {len(ex)} token rows for a batch of {off} tokens")
    doc_ids, tindex, tokens, domains = [], [], [], []
    for w, (d, s, e, k) in enumerate(wins):
        doc, ids = docs[d]
        doc_ids += [doc.doc_id] * (e - k)
        domains += [doc.domain] * (e - k)
        tindex.append(np.arange(k, e, dtype=np.int32))
        tokens.append(np.asarray(ids[k:e], dtype=np.int32))
    cat = (lambda xs, shape: np.concatenate(xs) if xs else np.zeros(shape))
    n_all = L * A
    table = routing_table(doc_ids, cat(tindex, 0), cat(tokens, 0), domains,
                          cat([ex_out[w] for w in range(len(wins))], (0, n_all)),
                          cat([w_out[w] for w in range(len(wins))], (0, n_all)), L, A,
                          modality=[str(m) for w in range(len(wins)) for m in m_out[w]])
    lg = None
    if logits:
        lgm = cat([lg_out[w] for w in range(len(wins))], (0, L * E)).astype(np.float16)
        lg = pa.Table.from_arrays([pa.array(doc_ids, pa.string()), pa.array(cat(tindex, 0)),
                                   pa.FixedSizeListArray.from_arrays(pa.array(lgm.reshape(-1)), L * E)],
                                  schema=logits_schema(L, E))
    return table, lg


def trace(checkpoint: str | Path, corpus: str | Path, out: str | Path, *, device: str = "cpu",
          dtype: torch.dtype = torch.float32, shard: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """Load `checkpoint` and trace `corpus` into `out`, on this process's shard (torchrun or `shard`).

    Under torchrun (WORLD_SIZE > 1) it joins the process group (gloo on CPU, nccl on CUDA), uses GPU
    LOCAL_RANK, and waits at a barrier for every rank, so rank 0 can report the whole dataset.
    """
    from q3lab.runtime.thinker import load
    from q3lab.base.tokenizer import load_tokenizer
    rank, world, dist = resolve_shard(shard)
    if dist:
        import torch.distributed as tdist
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(device)
        if not tdist.is_initialized():
            tdist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    model = load(checkpoint, device=device, dtype=dtype)
    if model.source.tokenizer_dir is None:
        raise InputError(f"{checkpoint}: no tokenizer files (tokenizer.json or vocab.json + merges.txt)")
    tok = load_tokenizer(model.source.tokenizer_dir)
    summary = trace_corpus(model, tok, corpus, out, rank=rank, world=world, checkpoint=str(checkpoint), **kwargs)
    if dist:
        import torch.distributed as tdist
        tdist.barrier()
        tdist.destroy_process_group()
    if rank == 0 and (world == 1 or dist):
        ds = open_dataset(out)
        summary.update(complete=ds.complete, dataset_tokens=ds.num_tokens, bytes_per_token=ds.bytes_per_token())
    return summary
