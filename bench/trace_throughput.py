"""Routing-atlas benchmark: traced tokens/s against transformers, bytes per token, analysis time and peak RSS.

    .venv/bin/python bench/trace_throughput.py trace [--checkpoint data/mini] [--corpus data/heldout.jsonl]
        [--tokens 20000] [--batch-size 8] [--window 512] [--device cpu|cuda] [--dtype fp32|bf16] [--repeats 3]
    .venv/bin/python bench/trace_throughput.py analysis [--dataset /tmp/atlas-1e7] [--tokens 10000000]

trace: `q3lab trace`'s loop end to end (tokenise, batched windows through `q3lab.record`, frames, Parquet
parts written atomically) against transformers' thinker text model (`q3lab.oracle.load_reference`, same
weights) run on the same batches and windows with `output_router_logits=True`, its top-k taken and
renormalised and copied to host (what a trace needs from it; nothing written). Repeats run interleaved; medians.
For the real dimensions on a GPU without a checkpoint on disk: --synthetic full --device cuda (random bf16 weights
made on the GPU, shared by both models as in bench/gpu_decode.py; a corpus of random token ids), e.g.

    python bench/trace_throughput.py trace --synthetic full --device cuda --tokens 32768 --batch-size 16 \
        --window 512 --keep $OUT/atlas --json $OUT/trace_throughput.json

analysis: writes (once; resumable) a synthetic dataset with the real thinker's routing shape (48 layers, top-8
of 128) of --tokens tokens, then runs `q3lab.atlas.queries.atlas()` on it in a fresh process and reports the
wall time and peak RSS (ru_maxrss).

Each run appends its table to bench/RESULTS.md with the machine, date and command.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _machine() -> str:
    import torch
    cpu = platform.processor() or platform.machine()
    return (f"{platform.node()} ({cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads)")


def _append(title: str, command: str, table: str, notes: list[str]) -> None:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = (f"\n## {title} ({when})\n\nMachine: {_machine()}\n\n    {command}\n\n```\n{table}\n```\n\n"
            + "".join(f"- {n}\n" for n in notes))
    with open(ROOT / "bench" / "RESULTS.md", "a") as f:
        f.write(text)
    print(text)


class IdsTokenizer:
    """A corpus whose texts are space-separated token ids (the synthetic mode: no tokenizer files needed)."""

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]


def synthetic_models(preset: str, layers: int | None, device: str, seed: int):
    """(q3lab Thinker, reference with .text_model) on ONE set of random bf16 weights made on `device` at the
    dimensions of a synth preset ("full": the real thinker), as bench/gpu_decode.py builds them."""
    import torch

    from q3lab.oracle import ReferenceThinker, build_reference_generator, text_model, thinker_sharing_weights
    from q3lab.weights.synthetic import preset_config
    cfg = preset_config(preset, layers=layers)
    hf = build_reference_generator(cfg, dtype=torch.bfloat16, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, prm in hf.named_parameters():
            if name.endswith("norm.weight"):
                prm.fill_(1.0)
            else:
                prm.normal_(0.0, 0.02, generator=g)
    return thinker_sharing_weights(hf, cfg), ReferenceThinker(text_model(hf), hf.lm_head)


def synthetic_corpus(path: Path, vocab: int, tokens: int, window: int, seed: int) -> Path:
    """A JSONL corpus of random token ids (as text) totalling `tokens`, documents of 0.25 to 2.5 windows (so that
    windows overlap and batches are padded, as in a real corpus)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    left, n = tokens, 0
    with open(path, "w") as f:
        while left > 0:
            k = min(left, int(rng.integers(window // 4, 5 * window // 2)))
            ids = rng.integers(0, vocab - 16, k)
            f.write(json.dumps({"id": f"d{n}", "text": " ".join(map(str, ids.tolist()))}) + "\n")
            left, n = left - k, n + 1
    return path


def bench_trace(args) -> None:
    import pandas as pd
    import torch

    import q3lab
    from q3lab.atlas.tracing import _encode_corpus, trace_corpus, windows
    from q3lab.oracle import load_reference
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.synthetic:
        model, ref = synthetic_models(args.synthetic, args.layers, args.device, args.seed)
        tok = IdsTokenizer()
        args.corpus = str(synthetic_corpus(Path(tempfile.mkdtemp(prefix="atlas-corpus-")) / "corpus.jsonl",
                                           model.config.vocab_size, args.tokens, args.window, args.seed))
        args.checkpoint, args.dtype = f"synthetic-{args.synthetic}", "bf16"
    else:
        model = q3lab.load(args.checkpoint, device=args.device, dtype=dtype)
        tok = q3lab.load_tokenizer(model.source.tokenizer_dir)
        ref = load_reference(model.source, dtype=dtype).to(args.device)
    cfg = model.config
    A = cfg.num_experts_per_tok
    stride = args.window // 2
    # the same windows and batches as the trace (one part: every window of the corpus prefix)
    wins = []
    for _, _, ids in _encode_corpus(args.corpus, tok, args.tokens):
        wins += [ids[s:e] for s, e, _ in windows(len(ids), args.window, stride)] if ids else []
    wins.sort(key=len, reverse=True)
    batches = []
    for b0 in range(0, len(wins), args.batch_size):
        rows = wins[b0:b0 + args.batch_size]
        T = max(map(len, rows))
        ids = torch.zeros((len(rows), T), dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, :len(row)] = torch.tensor(row)
            mask[r, :len(row)] = 1
        batches.append((ids.to(args.device), mask.to(args.device)))
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def run_reference() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for ids, mask in batches:
                out = ref.text_model(input_ids=ids, attention_mask=mask, output_router_logits=True)
                for lg in out.router_logits:
                    w, e = torch.topk(torch.softmax(lg.float(), -1), A, dim=-1)
                    (w / w.sum(-1, keepdim=True)).cpu().numpy(), e.cpu().numpy()
        sync()
        return time.perf_counter() - t0

    def run_q3lab() -> tuple[float, float, int]:
        out = Path(tempfile.mkdtemp(prefix="atlas-bench-"))
        if args.keep:                        # the dataset of the last run stays there
            out = Path(args.keep)
            shutil.rmtree(out, ignore_errors=True)
        try:
            t0 = time.perf_counter()
            s = trace_corpus(model, tok, args.corpus, out, batch_size=args.batch_size, window=args.window,
                             max_tokens=args.tokens, part_tokens=10**9, progress=False)
            sync()
            secs = time.perf_counter() - t0
            size = sum(p.stat().st_size for p in out.glob("part-*.parquet"))
            return secs, size / s["tokens"], s["tokens"]
        finally:
            if not args.keep:
                shutil.rmtree(out)

    run_reference(), run_q3lab()          # warm-up
    ref_t, q_t = [], []
    for _ in range(args.repeats):
        ref_t.append(run_reference())
        secs, bpt, n = run_q3lab()
        q_t.append(secs)
    kept = n
    computed = sum(int(m.sum()) for _, m in batches)
    rows = [dict(path="transformers output_router_logits=True (forward + top-k to host)",
                 computed_tok_s=computed / statistics.median(ref_t), kept_tok_s=float("nan"),
                 seconds=statistics.median(ref_t)),
            dict(path="q3lab trace (record + Parquet parts, end to end)",
                 computed_tok_s=computed / statistics.median(q_t), kept_tok_s=kept / statistics.median(q_t),
                 seconds=statistics.median(q_t))]
    table = pd.DataFrame(rows)
    table["ratio"] = table["computed_tok_s"] / table["computed_tok_s"].iloc[0]
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "bytes_per_token": bpt,
                                               "kept_tokens": kept, "computed_tokens": computed,
                                               "device": torch.cuda.get_device_name() if args.device.startswith(
                                                   "cuda") else "cpu", "torch": torch.__version__}, indent=1,
                                              default=str))
    _append(f"trace throughput, {Path(args.checkpoint).name}, {args.device} {args.dtype}",
            "python bench/trace_throughput.py trace " + " ".join(sys.argv[2:]),
            table.to_string(index=False, float_format=lambda x: f"{x:,.2f}"),
            [f"{kept:,} traced tokens of {args.corpus} ({computed:,} tokens computed: long documents overlap "
             f"by window/2 = {stride}), batch {args.batch_size}, window {args.window}; medians of {args.repeats} "
             f"interleaved repeats after a warm-up; ratio = computed tokens/s over transformers' in this run "
             f"(the same batches; kept_tok_s = tokens that reach the dataset, the overlap of long documents "
             f"excluded; q3lab's time includes tokenising, record's frames and writing the part)",
             f"dataset bytes per token on disk: {bpt:.1f} (zstd Parquet; {cfg.num_hidden_layers} layers x top-{A}: "
             f"{cfg.num_hidden_layers * A * 3 + 12} bytes before compression)"])


def bench_analysis(args) -> None:
    from q3lab.atlas.synthetic import synthetic_dataset
    path = Path(args.dataset)
    t0 = time.perf_counter()
    synthetic_dataset(path, args.tokens, part_tokens=262144, doc_tokens=2048, progress=True)
    gen = time.perf_counter() - t0
    code = ("import json, resource, sys, time; from q3lab.atlas import queries as Q; "
            "t = time.perf_counter(); r = Q.atlas(sys.argv[1]); s = time.perf_counter() - t; "
            "print(json.dumps({'seconds': s, 'rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "
            "'tokens': int(r['load']['count'].sum() // 384), "
            "'any_overlap_l0': float(r['overlap_summary']['any_overlap'][0])}))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env)
    if res.returncode:
        raise SystemExit(res.stderr)
    info = json.loads(res.stdout.strip().splitlines()[-1])
    size = sum(p.stat().st_size for p in path.glob("part-*.parquet"))
    table = (f"tokens {info['tokens']:,}  dataset {size / 1e9:.2f} GB ({size / info['tokens']:.0f} bytes/token)  "
             f"atlas() {info['seconds']:.0f} s  peak RSS {info['rss_mb']:,.0f} MB")
    _append(f"atlas analyses on a {args.tokens:.0e}-token synthetic dataset (48 layers, top-8 of 128)",
            "python bench/trace_throughput.py analysis " + " ".join(sys.argv[2:]), table,
            [f"dataset written in {gen:.0f} s (skipped when it already existed); atlas() = every analysis of "
             "q3lab.atlas.queries from one DuckDB scan (load, co-activation over the first 1e5 tokens, domains, "
             "vocabulary and token-id specialisation over the 4,096 most frequent ids, overlap, reuse distance) "
             "plus the cache curves (first 1,024 tokens) in a fresh process; peak RSS = ru_maxrss"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    t = sub.add_parser("trace")
    t.add_argument("--checkpoint", default=str(ROOT / "data" / "mini"))
    t.add_argument("--corpus", default=str(ROOT / "data" / "heldout.jsonl"))
    t.add_argument("--tokens", type=int, default=20000)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--window", type=int, default=512)
    t.add_argument("--device", default="cpu")
    t.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    t.add_argument("--repeats", type=int, default=3)
    t.add_argument("--synthetic", metavar="PRESET", default=None,
                   help="random bf16 weights at a synth preset's dimensions made on --device (full: the real "
                        "thinker, e.g. on an H200) and a corpus of random token ids, instead of --checkpoint")
    t.add_argument("--layers", type=int, default=None, help="with --synthetic: another layer count")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--keep", default=None, help="write the (last run's) dataset into this folder and keep it")
    t.add_argument("--json", default=None, help="write the rows as JSON here")
    a = sub.add_parser("analysis")
    a.add_argument("--dataset", default="/tmp/atlas-1e7")
    a.add_argument("--tokens", type=int, default=10_000_000)
    args = ap.parse_args()
    bench_trace(args) if args.what == "trace" else bench_analysis(args)


if __name__ == "__main__":
    main()
