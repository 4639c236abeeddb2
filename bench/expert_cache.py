"""The on-demand expert cache against the all-resident model, on one synthetic checkpoint, in one run.

    .venv/bin/python bench/expert_cache.py [--preset medium --layers 2] [--capacities 8,16,32,64] [--repeats 3]
        [--per-layer] [--dtype bf16|fp32] [--checkpoint DIR] [--no-write]

Defaults took 1 minute on 2 CPU cores (3 minutes while other jobs ran); the synthetic checkpoint
(427 MB) is written once to out/bench/ and reused.

Part 1, speed and memory: every configuration (all experts resident, then a cache of each capacity) runs in a
fresh subprocess, repeats interleaved (A B C A B C ...) so that load from other processes hits all of them
alike. Each run loads the model, greedily generates --new-tokens after a --prompt-tokens prompt, and reports
decode tokens/s (after the first token) and the peak anonymous resident memory (RssAnon, sampled after every
layer's experts and after every expert load) above its baseline. Medians of the repeats, and ratios to the
resident model's median; every run's tokens are checked equal to the resident model's.

Part 2, hit rates: the access trace of the same generation is logged by a cache (log_accesses=True); then
each policy runs live on that trace for each capacity, and so does Belady's offline policy (which needs
the trace), whose hit rate bounds every policy's.

Results are appended to bench/RESULTS.md as a new section (--no-write: print only).
Expert loads come from the page cache here (the checkpoint was just written), not from a cold disk.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# -- the worker: one configuration, in its own process -------------------------------------------------
def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


def worker(spec: dict) -> dict:
    import torch

    import q3lab
    from q3lab.runtime.experts import ExpertCache

    torch.set_num_threads(spec["threads"])
    base_import = rss_anon()
    cache = ExpertCache(spec["capacity"], policy=spec["policy"], per_layer=spec["per_layer"]) \
        if spec["capacity"] else None
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    t0 = time.perf_counter()
    model = q3lab.load(spec["path"], dtype=dtype, experts=cache)
    load_s = time.perf_counter() - t0
    base_loaded = rss_anon()
    peak = [base_loaded]

    def sample(*_):
        peak[0] = max(peak[0], rss_anon())
    if cache is not None:
        read = cache._read
        cache._read = lambda key, prefetch: (read(key, prefetch), sample())[0]
    for layer in model.model.layers:
        layer.mlp.experts.register_forward_hook(sample)
    ids = prompt_ids(model.config.vocab_size, spec["prompt_tokens"])
    stamps, cpu = [], []

    def stream(tok):
        stamps.append(time.perf_counter())
        cpu.append(time.process_time())
    t0 = time.perf_counter()
    out = model.generate(ids, spec["new_tokens"], streamer=stream)
    decode_s = stamps[-1] - stamps[0]
    return dict(
        tokens=out[0].tolist(), load_s=load_s, prefill_s=stamps[0] - t0, decode_s=decode_s,
        decode_tok_s=(len(stamps) - 1) / decode_s, decode_cpu_ms=1000 * (cpu[-1] - cpu[0]) / (len(cpu) - 1),
        base_import=base_import, base_loaded=base_loaded,
        peak=peak[0], expert_bytes=model.config.expert_numel * torch.empty((), dtype=dtype).element_size(),
        dense_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
        summary=cache.summary() if cache is not None else None)


def prompt_ids(vocab: int, n: int):
    import torch
    return torch.randint(0, min(vocab, 4000), (1, n), generator=torch.Generator().manual_seed(0))


def run_worker(spec: dict) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                         env=env, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"worker failed for {spec}:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- part 2: hit rates of every policy against Belady, live, on one trace ------------------------------
def hit_rates(path: Path, args, capacities: list[int]) -> list[dict]:
    import torch

    import q3lab
    from q3lab.runtime.experts import ExpertCache

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]

    def run(cache):
        model = q3lab.load(path, dtype=dtype, experts=cache)
        return model.generate(prompt_ids(model.config.vocab_size, args.prompt_tokens), args.new_tokens)

    logger = ExpertCache(capacities[-1], log_accesses=True, per_layer=args.per_layer)
    want = run(logger)
    trace = logger.trace()
    rows = []
    for cap in capacities:
        row = dict(capacity=cap, accesses=len(trace))
        for policy in args.policies + ["belady"]:
            cache = ExpertCache(cap, policy=policy, per_layer=args.per_layer, log_accesses=True,
                                trace=trace if policy == "belady" else None)
            got = run(cache)
            if got.tolist() != want.tolist() or cache.trace() != trace:
                raise SystemExit(f"{policy} at capacity {cap}: tokens or access trace differ from the logged run")
            row[policy] = cache.summary()["hit_rate"]
        rows.append(row)
    return rows


# -- the driver ---------------------------------------------------------------------------------------
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def mib(x: float) -> str:
    return f"{x / 2**20:.1f}"


def speed_memory(path: Path, args, capacities: list[int]) -> tuple[list[dict], dict]:
    configs = [0] + capacities
    runs: dict[int, list[dict]] = {c: [] for c in configs}
    base = dict(path=str(path), dtype=args.dtype, policy="lru", per_layer=args.per_layer, threads=args.threads,
                prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens)
    for r in range(args.repeats):
        for cap in configs:
            res = run_worker({**base, "capacity": cap})
            runs[cap].append(res)
            print(f"  repeat {r + 1}/{args.repeats}  {'resident' if not cap else f'cache {cap}':>10}: "
                  f"{res['decode_tok_s']:.2f} tok/s, peak +{mib(res['peak'] - res['base_import'])} MiB",
                  flush=True)
    want = runs[0][0]["tokens"]
    for cap, rs in runs.items():
        if any(r["tokens"] != want for r in rs):
            raise SystemExit(f"capacity {cap}: generated tokens differ from the resident model's")
    med = {c: statistics.median(r["decode_tok_s"] for r in rs) for c, rs in runs.items()}
    cpu = {c: statistics.median(r["decode_cpu_ms"] for r in rs) for c, rs in runs.items()}
    rows = []
    first = runs[0][0]
    eb = first["expert_bytes"]
    for cap, rs in runs.items():
        peak = statistics.median(r["peak"] - r["base_import"] for r in rs)
        grew = statistics.median(r["peak"] - r["base_loaded"] for r in rs)
        s = rs[0]["summary"]
        rows.append({
            "experts": "all resident" if not cap else f"cache {cap}" + (" per layer" if args.per_layer else ""),
            "cache MiB": "-" if not cap else mib(cap * eb * (first["layers"] if args.per_layer else 1)),
            "decode tok/s (median)": f"{med[cap]:.2f}",
            "range": f"{min(r['decode_tok_s'] for r in rs):.2f}-{max(r['decode_tok_s'] for r in rs):.2f}",
            "vs resident": f"{med[cap] / med[0]:.2f}x",
            "decode CPU ms/token": f"{cpu[cap]:.1f}",
            "CPU vs resident": f"{cpu[cap] / cpu[0]:.2f}x",
            "prefill s": f"{statistics.median(r['prefill_s'] for r in rs):.2f}",
            "peak RssAnon MiB": mib(peak),
            "of which after load": mib(grew),
            "hit rate": "-" if not cap else f"{s['hit_rate']:.3f}",
            "MiB loaded": "-" if not cap else mib(s["bytes_loaded"]),
            "load s": "-" if not cap else f"{statistics.median(r['summary']['load_seconds'] for r in rs):.2f}",
        })
    return rows, first


def table(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_results(path: Path, text: str) -> None:
    """Append a section: runs on other machines or with other options keep their own."""
    head = "" if path.exists() else ("# Benchmark results\n\nEach section: what ran, where, when. Newest sections "
                                     "are appended.\n")
    with open(path, "a") as f:
        f.write(head + "\n" + text.rstrip() + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", type=Path, help="an existing checkpoint or store (default: a synthetic one)")
    p.add_argument("--preset", default="medium", help="synth preset (default %(default)s)")
    p.add_argument("--layers", type=int, default=2, help="synth layer count (default %(default)s)")
    p.add_argument("--out", type=Path, default=ROOT / "out" / "bench", help="where synthetic checkpoints go")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="model dtype (default %(default)s)")
    p.add_argument("--capacities", default="8,16,32,64", help="cache sizes in experts (default %(default)s)")
    p.add_argument("--per-layer", action="store_true", help="capacities per layer instead of in all")
    p.add_argument("--policies", default="lru,lfu,score", help="policies compared with Belady (default %(default)s)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default %(default)s: CPU time per "
                                                        "token is then comparable on a busy machine)")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md")
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = p.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        res = worker(spec)
        res["layers"] = json.loads(Path(spec["path"], "config.json").read_text()).get("thinker_config", {}) \
            .get("text_config", {}).get("num_hidden_layers")
        print(json.dumps(res))
        return 0
    args.policies = [s for s in args.policies.split(",") if s]
    capacities = sorted(int(c) for c in args.capacities.split(","))
    command = ".venv/bin/python bench/expert_cache.py " + " ".join(argv if argv is not None else sys.argv[1:])

    from q3lab.base.config import ThinkerConfig
    if args.checkpoint:
        path = args.checkpoint
    else:
        from q3lab.weights.synthetic import synth
        path = args.out / f"{args.preset}-L{args.layers}-seed0"
        t0 = time.perf_counter()
        synth(path, args.preset, layers=args.layers, seed=0, progress=False)  # reuses complete shards
        print(f"checkpoint {path} ready in {time.perf_counter() - t0:.1f} s", flush=True)
    cfg = ThinkerConfig.from_file(path)
    total = cfg.num_hidden_layers * cfg.num_experts
    print(f"{cfg.num_hidden_layers} layers x {cfg.num_experts} experts (top-{cfg.num_experts_per_tok}), "
          f"hidden {cfg.hidden_size}, expert intermediate {cfg.moe_intermediate_size}; {total} experts")

    t0 = time.perf_counter()
    print("part 1: speed and memory", flush=True)
    rows, first = speed_memory(path, args, capacities)
    print("part 2: hit rates on the logged trace", flush=True)
    hits = hit_rates(path, args, capacities)
    elapsed = time.perf_counter() - t0

    import torch
    eb, dense = first["expert_bytes"], first["dense_bytes"]
    hit_rows = [{"capacity": f"{h['capacity']}{' per layer' if args.per_layer else ''}", "accesses": h["accesses"],
                 **{pol: f"{h[pol]:.3f}" for pol in args.policies},
                 "belady": f"{h['belady']:.3f}",
                 **{f"{pol}/belady": f"{h[pol] / h['belady']:.2f}" if h["belady"] else "-" for pol in args.policies}}
                for h in hits]
    source = f"`{args.checkpoint}`" if args.checkpoint else f"synth preset {args.preset}, {args.layers} layers, seed 0"
    text = "\n".join([
        "## Expert cache (`bench/expert_cache.py`)",
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {platform.platform()}; {cpu_name()}; "
        f"{os.cpu_count()} CPUs; torch {torch.__version__}, {args.threads} threads per run; Python "
        f"{platform.python_version()}.",
        "",
        "Command:",
        "",
        f"    {command.strip()}",
        "",
        f"Checkpoint: {source}"
        f": {cfg.num_hidden_layers} layers x {cfg.num_experts} experts (top-{cfg.num_experts_per_tok}), "
        f"model dtype {args.dtype}: {mib(eb)} MiB per expert, {mib(eb * total)} MiB of experts, {mib(dense)} MiB "
        f"of other weights. Greedy, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens; "
        f"{args.repeats} repeats per configuration, each in its own process, interleaved; the benchmark took "
        f"{elapsed:.0f} s. Generated tokens were equal in every run.",
        "",
        "Speed and memory (LRU cache). Decode tok/s (wall clock) and CPU ms/token (the process's CPU time, "
        "steadier than wall time when other processes compete for the cores) exclude the first token "
        "(prefill). Peak RssAnon is above "
        "the process's baseline after `import torch, q3lab`; \"of which after load\" is the growth during "
        "generation, which the cache bounds by its capacity (plus a small fixed overhead).",
        "",
        table(rows),
        "",
        f"Hit rates of the live cache on the same trace (the access sequence of this generation: "
        f"{hits[0]['accesses']} accesses), Belady's offline optimum last:",
        "",
        table(hit_rows),
        "",
        "Expert loads were served from the page cache (the checkpoint had just been written), so load times are "
        "memory copies; reads from a cold disk would be slower. The machine is shared: medians over interleaved "
        "repeats, and ratios within this run, are the numbers to compare.",
    ])
    print()
    print(text)
    if not args.no_write:
        write_results(args.results, text)
        print(f"\nwrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
