"""Offloaded experts as a 24 GB card runs them (issue 19): every row in one run, on one GPU at the real dimensions.

    python bench/gpu_offload.py [--budgets 0.32,0.16,0.08] [--prompt 512] [--new-tokens 128]

Weights: random bf16 (std 0.02, norms 1) at the full thinker dimensions; the dense part on the GPU, the experts
(58 GB) made on the GPU layer by layer and kept in pinned host memory. One `OffloadedDecoder` (compiled + fused
kernels + per-layer segment graphs, with the next-layer predictor and the host-expert path captured) serves every
row: between rows only the cache's residency is replaced (`DeviceExpertCache.reconfigure`, same slab).

Routings:
- synthetic: the random weights' own router (the cache's best case: every token goes to nearly the same experts);
- uniform: uniform random top-8 per (token, layer) (the worst case: no reuse);
- mini128: replayed routing of data/mini128 (48 x 128 x top-8, the real topology) over its held-out documents
  (bench/data/mini128_heldout_routing.npz, made by bench/make_offload_trace.py): the first 512 tokens of a
  document are the prompt (they only fill the cache, `DeviceExpertCache.warm`), the next 128 are decoded.
Each row: tokens/s (mean step time of the 128 decode steps), hit rate, Belady's hit rate on the same trace and
capacity (q3lab.analysis.cachesim), GB copied per token, achieved link GB/s, and the floor the copies imply at the
measured pinned-H2D rate. Prefetch rows add the prediction accuracy, the bytes wasted on wrong guesses and the
time saved against the same row without prefetch; host rows the experts computed on the host and their time.
Also checked: the offloaded decoder's greedy tokens and KV cache bit-equal to the resident StaticDecoder (no
replay), with prefetch on.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.timing import sync as _sync, sync_time  # noqa: E402
from q3lab.fast.device_cache import DeviceExpertCache  # noqa: E402
from q3lab.fast.decoders import OffloadedDecoder, StaticDecoder  # noqa: E402
from q3lab.fast.host_experts import HostExperts, HostSplit, time_host_expert  # noqa: E402
from q3lab.runtime.thinker import Thinker, rope_inv_freq  # noqa: E402
from q3lab.analysis.replay import (Replay, belady_hit_rate, capacities_from_trace, decode_keys, load_trace,  # noqa: E402
                          uniform_trace)
from q3lab.weights.synthetic import preset_config  # noqa: E402

GB = 1e9
ROOT = Path(__file__).resolve().parent.parent
DEV = "cuda"


def log(*a) -> None:
    print(*a, flush=True)




def h2d_rate(expert_shape, pin: bool, n: int = 64) -> float:
    """Pinned host -> device bytes/s copying whole experts (3 tensors each) back to back on one stream."""
    I, D = expert_shape
    host = torch.randn(n, 3, I, D).to(torch.bfloat16)
    if pin:
        host = host.pin_memory()
    dev = torch.empty_like(host, device=DEV)
    for i in range(n):
        dev[i].copy_(host[i], non_blocking=True)

    def run():
        for i in range(n):
            for j in range(3):
                dev[i, j].copy_(host[i, j], non_blocking=True)
    t = statistics.median(sync_time(run) for _ in range(5))
    return host.nbytes / t


def build(cfg, seed: int, pin: bool):
    """(q3lab Thinker with random dense weights on DEV, host experts gate/up/down [L, E, I, D] / [L, E, D, I])."""
    with torch.device("meta"):
        model = Thinker(cfg)
    model = model.to_empty(device=DEV).to(torch.bfloat16)
    g = torch.Generator(device=DEV).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight") or "qk_norm" in name \
                    or name.endswith("q_norm.weight") or name.endswith("k_norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    model.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta).to(DEV)
    L, E, I, D = cfg.num_hidden_layers, cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
    gate = torch.empty(L, E, I, D, dtype=torch.bfloat16, pin_memory=pin)
    up = torch.empty(L, E, I, D, dtype=torch.bfloat16, pin_memory=pin)
    down = torch.empty(L, E, D, I, dtype=torch.bfloat16, pin_memory=pin)
    for layer in range(L):      # made on the GPU (fast), kept on the host
        for t in (gate, up, down):
            t[layer].copy_(torch.empty(t.shape[1:], device=DEV, dtype=torch.bfloat16).normal_(0, 0.02, generator=g))
    return model.eval(), (gate, up, down)


def overlap_probe(host: HostExperts, hg, hu, hd, expert_bytes: int, n_copy: int = 24, n_host: int = 8) -> dict:
    """Whether the host's expert compute and the link's copies run at the same time: copies of n_copy experts
    alone, n_host experts computed on the host alone, then both (copies issued first, as the decoder does),
    at the host's full thread count and at half of it."""
    I, D = hg.shape[2], hg.shape[3]
    dst = torch.empty(n_copy, 2, I, D, dtype=torch.bfloat16, device=DEV)
    dst_down = torch.empty(n_copy, D, I, dtype=torch.bfloat16, device=DEV)
    stream = torch.cuda.Stream()
    h = torch.randn(D).to(torch.bfloat16)
    out = {}
    full = host.threads or torch.get_num_threads()
    def copies(base):
        with torch.cuda.stream(stream):
            for k in range(n_copy):
                lay, e = divmod(base + k, hg.shape[1])
                dst[k, 0].copy_(hg[lay % hg.shape[0], e], non_blocking=True)
                dst[k, 1].copy_(hu[lay % hg.shape[0], e], non_blocking=True)
                dst_down[k].copy_(hd[lay % hg.shape[0], e], non_blocking=True)
    for threads in (full, max(full // 2, 1)):
        host.threads = threads
        host.compute_sum(5, h, list(range(n_host)), [0.1] * n_host)
        t = time.perf_counter(); copies(0); torch.cuda.synchronize(); t_copy = time.perf_counter() - t
        t = time.perf_counter(); host.compute_sum(7, h, list(range(n_host)), [0.1] * n_host); t_host = time.perf_counter() - t
        t = time.perf_counter(); copies(600); host.compute_sum(9, h, list(range(n_host)), [0.1] * n_host)
        t_mid = time.perf_counter() - t
        torch.cuda.synchronize(); t_both = time.perf_counter() - t
        out[threads] = dict(copy_ms=t_copy * 1e3, host_ms=t_host * 1e3, both_ms=t_both * 1e3,
                            host_done_ms=t_mid * 1e3, link_GBps=n_copy * expert_bytes / t_copy / GB)
        log(f"overlap probe, {threads} host threads: {n_copy} copies {t_copy * 1e3:.2f} ms "
            f"({n_copy * expert_bytes / t_copy / GB:.1f} GB/s), {n_host} host experts {t_host * 1e3:.2f} ms, both "
            f"{t_both * 1e3:.2f} ms (host part done at {t_mid * 1e3:.2f}); sum {(t_copy + t_host) * 1e3:.2f}, "
            f"max {max(t_copy, t_host) * 1e3:.2f}")
    host.threads = full
    del dst, dst_down
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="full")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--budgets", default="0.32,0.16,0.08")
    ap.add_argument("--trace", type=Path, default=ROOT / "bench" / "data" / "mini128_heldout_routing.npz")
    ap.add_argument("--seq", type=int, default=0, help="which replayed sequence is timed")
    ap.add_argument("--host-threads", type=int, default=os.cpu_count())
    ap.add_argument("--host-kernel", default=None, choices=["c", "torch"],
                    help="HostExperts kernel (default: C where q3lab.kernels.cpu builds)")
    ap.add_argument("--device", default="cuda", help="cpu only for a smoke test (with --preset small)")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--no-fused", dest="fused", action="store_false")
    ap.add_argument("--quick", action="store_true", help="the 32%% rows only")
    ap.add_argument("--smoke-topology", action="store_true",
                    help="the tiny preset with 48 layers x 128 experts top-8 (a CPU smoke test of the replay rows)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = ap.parse_args()
    global DEV
    DEV = args.device
    pin = DEV == "cuda"
    if DEV == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/gpu_offload.py needs a CUDA GPU (or --device cpu --preset small for a smoke test)")
    t_start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    res: dict = {"args": {k: str(v) for k, v in vars(args).items()},
                 "gpu": torch.cuda.get_device_name() if DEV == "cuda" else "cpu", "torch": torch.__version__,
                 "host_cpus": os.cpu_count()}
    rows: list[dict] = []

    def save():
        (args.out / "gpu_offload.json").write_text(json.dumps(res | {"rows": rows}, indent=1, default=str))

    cfg = preset_config(args.preset, **({"layers": args.layers} if args.layers else {}))
    if args.smoke_topology:
        from q3lab.base.config import ThinkerConfig
        from q3lab.weights.synthetic import PRESETS
        cfg = ThinkerConfig(**(dict(PRESETS["tiny"]) | dict(num_hidden_layers=48, num_experts=128,
                                                           num_experts_per_tok=8, moe_intermediate_size=8)))
    L, E, A, I, D = (cfg.num_hidden_layers, cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size,
                     cfg.hidden_size)
    log(f"# {res['gpu']}, torch {torch.__version__}, {os.cpu_count()} host CPUs; {L} layers x {E} experts top-{A}")
    link = h2d_rate((I, D), pin)
    res["h2d_GBps"] = link / GB
    t = time.perf_counter()
    model, (hg, hu, hd) = build(cfg, 0, pin)
    _sync()
    log(f"pinned H2D (whole experts) {link / GB:.1f} GB/s; built in {time.perf_counter() - t:.0f} s: dense on the "
        f"GPU, experts {(hg.nbytes + hu.nbytes + hd.nbytes) / GB:.1f} GB in {'pinned ' if pin else ''}host memory")

    # -- the host's rate for one expert (16 cores on the H200 machine) ----------------------------
    # the C kernels (q3lab.kernels.cpu, built here on first use) and their torch twin, timed alike
    host = host_obj = HostExperts(hg, hu, hd, threads=args.host_threads, kernel=args.host_kernel)
    host_torch = HostExperts(hg, hu, hd, threads=args.host_threads, kernel="torch")
    expert_bytes = 3 * I * D * 2
    host_rates = {}
    for name, hx in (("torch", host_torch), (host.kernel, host)):
        for n in (1, 4):
            host_rates[(name, n)] = time_host_expert(hx, layer=1, experts=n)
    host_s = host_rates[(host.kernel, 4)]
    host_s_torch = host_rates[("torch", 4)]
    res["host_kernel"], res["host_isa"] = host.kernel, host.isa()
    res["host_ms_per_expert"], res["link_ms_per_expert"] = host_s * 1e3, expert_bytes / link * 1e3
    res["host_ms_per_expert_by_kernel"] = {f"{k}_{n}": v * 1e3 for (k, n), v in host_rates.items()}
    log(f"host kernel {host.kernel} ({host.isa()}), {args.host_threads} threads")
    for (name, n), v in host_rates.items():
        log(f"host {name:5s} {n} expert(s) a call: {v * 1e3:.3f} ms per expert ({expert_bytes / v / GB:.1f} GB/s "
            f"of weights)")
    log(f"host: {host_s * 1e3:.3f} ms per expert on {args.host_threads} threads "
        f"({expert_bytes / host_s / GB:.1f} GB/s of weights); link {expert_bytes / link * 1e3:.3f} ms per expert")

    if DEV == "cuda":
        res["overlap_probe"] = overlap_probe(host, hg, hu, hd, expert_bytes)
    budgets = [float(b) for b in args.budgets.split(",")]
    if args.quick:
        budgets = budgets[:1]
    cap_max = int(round(max(budgets) * L * E))
    cache = DeviceExpertCache(hg, hu, hd, cap_max, device=DEV)
    P, N = args.prompt, args.new_tokens
    n_check = 32
    max_len = P + max(N, n_check) + 8
    kw = dict(compile=args.compile and DEV == "cuda", fused=args.fused and DEV == "cuda",
              fused_router=args.fused and DEV == "cuda")
    t = time.perf_counter()
    off = OffloadedDecoder(model, max_len, cache, prefetch=True, host_experts=host,
                           host_split=HostSplit(L, expert_bytes, link, host_s), **kw)
    off.host_split = None
    res["raw_driver_copies"] = cache._raw is not None
    log(f"offloaded decoder {kw} built and captured in {time.perf_counter() - t:.0f} s; slab {cap_max} experts "
        f"({cap_max * expert_bytes / GB:.1f} GB); copies issued by "
        f"{'cuMemcpyHtoDAsync directly' if cache._raw is not None else 'torch copy_'}")
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size - 16, (1, P), generator=g).to(DEV)

    # -- bit-equality with the resident decoder (no replay), prefetch on ----------------------------
    with torch.inference_mode():
        off.prefetch = True
        got = off.generate(prompt, n_check).clone()
        got_k = off.cache.k[:, :, :, :P + n_check - 1].clone()
        resident = tuple(t.to(DEV) for t in (hg, hu, hd))
        dec = StaticDecoder(model, max_len, layer_experts=lambda l: (resident[0][l], resident[1][l],
                                                                      resident[2][l]), **kw)
        want = dec.generate(prompt, n_check)
        want_k = dec.cache.k[:, :, :, :P + n_check - 1]
        eq_tok, eq_kv = torch.equal(got, want), torch.equal(got_k, want_k)
        # host-computed misses: a tolerance, greedy tokens reported
        cache.reconfigure(cap_max)
        off.host_split = HostSplit(L, expert_bytes, link, host_s, max_host=4)
        off.host_split.split = lambda layer, m: min(m, 4)            # force the host path for this check
        model.set_experts(cache)
        got_h = off.generate(prompt, n_check)
        hk = off.cache.k[:, :, :, :P + n_check - 1].float()
        host_kerr = ((hk - want_k.float()).norm() / want_k.float().norm()).item()
        host_tok = int((got_h[0, P:] == want[0, P:]).cumprod(0).sum())
        off.host_split = None
        del dec, resident, want_k, got_k, hk
    if DEV == "cuda":
        torch.cuda.empty_cache()
    res.update(offload_vs_resident_tokens_bit_equal=eq_tok, offload_vs_resident_kv_bit_equal=eq_kv,
               host_path_kv_rel_err=host_kerr, host_path_tokens_equal=f"{host_tok}/{n_check}")
    log(f"offloaded (prefetch on) vs resident StaticDecoder: tokens bit-equal {eq_tok}, KV bit-equal {eq_kv} "
        f"({n_check} tokens after {P}); host-computed misses (forced, 4 per layer): greedy tokens equal "
        f"{host_tok}/{n_check}, KV rel. error {host_kerr:.1e}")
    save()

    # -- routings ----------------------------------------------------------------------------------
    model.set_experts(cache)
    with torch.inference_mode():
        off.prefill(prompt)
    state = [t.clone() for t in (off.tok, off.pos, off.slot, off.n)]
    traces = {"uniform": uniform_trace(1, P + N, L, E, A, seed=7)}
    if args.trace.is_file() and (L, E, A) == (48, 128, 8):
        tr = load_trace(args.trace)
        if tr.shape[1] < P + N:
            sys.exit(f"{args.trace}: {tr.shape[1]} tokens per sequence, the bench needs {P + N}")
        traces["mini128"] = tr
    else:
        log(f"(no mini128 replay: {args.trace} missing or topology {L}x{E}x{A} is not 48x128x8)")
    seq_of = {"uniform": 0, "mini128": args.seq}

    def run_row(routing: str, budget: float, policy: str = "lru", *, prefetch: bool = False, host: bool = False,
                adaptive: bool = False, host_threads: int | None = None, label: str = "",
                kernel: str | None = None, gpu_profile: bool = False, bias: float = 1.0) -> dict:
        cap = int(round(budget * L * E))
        rkw: dict = {}
        tr = traces.get(routing)
        s = seq_of.get(routing, 0)
        ex = tr.experts[s, :P + N] if tr is not None else None
        wt = tr.weights[s, :P + N] if tr is not None and tr.weights is not None else None
        pol = policy
        if policy == "pinned":           # the prompt's most used experts pinned, one token's worth left to LRU
            room = L * A
            counts = Counter(k for k in decode_keys(ex[:P])) if ex is not None else Counter()
            rkw["pinned"] = [k for k, _ in counts.most_common(max(cap - room, 0))]
            pol = "lru"
        if adaptive:
            capacity = capacities_from_trace(ex[:P], cap, step=4, num_experts=E)
            rkw["per_layer"] = True
        else:
            capacity = cap
        cache.reconfigure(capacity, policy="lru" if pol == "belady" else pol, **rkw)
        off.prefetch = prefetch
        hx = host_torch if kernel == "torch" else host_obj
        off.host_experts = hx
        off.host_split = HostSplit(L, expert_bytes, link, host_s_torch if kernel == "torch" else host_s,
                                   bias=bias) if host else None
        hx.threads = host_threads or args.host_threads
        with torch.inference_mode():
            if tr is None:                                         # synthetic: the model's own routing
                off.route_override = None
                off.prefill(prompt)
            else:
                for dst, src in zip((off.tok, off.pos, off.slot, off.n), state):
                    dst.copy_(src)
                if pol == "belady":
                    cache.residency.restart("belady", trace=decode_keys(ex))
                groups = [(layer, ex[t_, layer].tolist(), None if wt is None else wt[t_, layer].tolist())
                          for t_ in range(P) for layer in range(L)]
                cache.warm(groups)
                off.route_override = Replay(tr, s, start=P)
            cache.reset_stats()
            off.reset_offload_stats()
            off.profile_phases()          # perf_counter laps only: a few us a token
            n_ev = min(16, N // 4) if gpu_profile else 0
            steps = [sync_time(off.step) for _ in range(N - n_ev)]
            phases = off.phase_frame()
            if n_ev:                      # the last steps also with CUDA events (~1 ms a step more host work)
                off.profile_phases(gpu=True)
                steps += [sync_time(off.step) for _ in range(n_ev)]
                g = off.phase_frame()
                phases = pd.concat([phases, g[g.phase.str.startswith("gpu_")]], ignore_index=True)
            off.profile_phases(False)
        off.route_override = None
        st = cache.stats()
        per = statistics.fmean(steps)
        moved = st["bytes_copied"] / N
        row = dict(routing=routing, budget=budget, capacity=cap, policy=policy + (" per-layer" if adaptive else ""),
                   prefetch=prefetch, host=host and (host_threads or args.host_threads), ms_per_token=per * 1e3, tok_s=1 / per,
                   median_ms=statistics.median(steps) * 1e3, hit_rate=st["hit_rate"],
                   GB_per_token=moved / GB, link_GBps=moved / per / GB, floor_ms=moved / link * 1e3)
        if ex is not None:
            key = (routing, cap)
            if key not in belady_cache:
                belady_cache[key] = belady_hit_rate(ex, cap, P)
            row["belady_hit_rate"] = belady_cache[key]
        ls = off.offload_stats()
        if prefetch:
            row["prediction_accuracy"] = float(ls.predicted.sum() / max(ls.guessed.sum(), 1))
            row["prefetch_loads"] = st["prefetch_loads"]
            row["GB_wasted_per_token"] = (st["prefetch_loads"] - st["prefetch_hits"]) * expert_bytes / N / GB
            base = base_ms.get((routing, budget, policy, adaptive, host))
            if base is not None:
                row["saved_ms_vs_no_prefetch"] = base - per * 1e3
            # per layer: the copies issued ahead of use that were used (their time overlapped the previous
            # layer's work instead of stalling this one) and the bytes of guesses never used
            ls["prefetched_copy_ms_per_token"] = ls.prefetch_hits * expert_bytes / link / N * 1e3
            ls["wasted_MB_per_token"] = (ls.prefetch_loads - ls.prefetch_hits).clip(lower=0) * expert_bytes / N / 1e6
            ls.to_csv(args.out / f"layers_{routing}_{int(budget * 100)}_{policy}_prefetch{'_host' if host else ''}.csv",
                      index=False)
            if routing == "mini128" and not host and not printed_layers:
                printed_layers.append(True)
                cols = ["layer", "prediction_accuracy", "hit_rate", "prefetch_loads", "prefetch_hits",
                        "prefetched_copy_ms_per_token", "wasted_MB_per_token"]
                log(f"per layer, {routing} {budget:.0%} {policy} + prefetch:")
                log(ls[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        else:
            base_ms[(routing, budget, policy, adaptive, host)] = per * 1e3
        if host:
            row["host_kernel"] = hx.kernel
            row["split_bias"] = bias
            row["host_experts_per_token"] = float(ls.host_experts.sum() / N)
            row["host_ms_per_token"] = float(ls.host_ms.sum() / N)
            ls.to_csv(args.out / f"layers_{routing}_{int(budget * 100)}_{policy}_host.csv", index=False)
        row["label"] = label
        rows.append(row)
        tag = f"{routing} {budget:.0%} {row['policy']}{' +prefetch' if prefetch else ''}" + \
            (f" +host{row['host']}{'' if hx.kernel == 'c' else ' ' + hx.kernel}" if host else "") + \
            (f" bias{bias}" if bias != 1.0 else "")
        phase_tables[tag] = phases.assign(ms_per_token_measured=per * 1e3)
        res.setdefault("phases", {})[tag] = dict(zip(phases.phase, phases.ms_per_token)) | {
            "measured_ms_per_token": per * 1e3}
        log(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        log("  phases ms/token: " + " ".join(f"{p}={v:.2f}" for p, v in zip(phases.phase, phases.ms_per_token)))
        save()
        return row

    belady_cache: dict = {}
    phase_tables: dict = {}
    base_ms: dict = {}
    printed_layers: list = []
    b0 = budgets[0]
    half = max((args.host_threads or 2) // 2, 1)
    gp = {"gpu_profile": True}
    plan = [("synthetic", b0, "lru", gp)]
    plan += [("uniform", b0, "lru", gp), ("uniform", b0, "lru", {"host": True, **gp}),
             ("uniform", b0, "lru", {"host": True, "host_threads": half}),
             ("uniform", b0, "lru", {"host": True, "kernel": "torch", "label": "torch twin", **gp}),
             # the split rule checked: more of the misses to the host, then more to the link
             ("uniform", b0, "lru", {"host": True, "bias": 0.6, "label": "split bias 0.6"}),
             ("uniform", b0, "lru", {"host": True, "bias": 1.6, "label": "split bias 1.6"}),
             ("uniform", b0, "lru", {"prefetch": True})]
    if "mini128" in traces:
        for pol in ("lru", "lfu", "score", "belady", "pinned"):
            plan.append(("mini128", b0, pol, gp if pol == "lfu" else {}))
        plan += [("mini128", b0, "lfu", {"adaptive": True}),
                 ("mini128", b0, "lru", {"prefetch": True}), ("mini128", b0, "lfu", {"prefetch": True}),
                 ("mini128", b0, "lfu", {"host": True, **gp}), ("mini128", b0, "lfu", {"prefetch": True, "host": True})]
    for b in budgets[1:]:
        plan += [("uniform", b, "lru", {}), ("uniform", b, "lru", {"host": True})]
        if "mini128" in traces:
            plan += [("mini128", b, "lfu", {}), ("mini128", b, "lfu", {"prefetch": True})]
    log(f"{len(plan)} rows; setup took {time.perf_counter() - t_start:.0f} s")
    for routing, b, pol, opts in plan:
        try:
            run_row(routing, b, pol, **opts)
        except Exception as e:      # a failing row is reported; the others still run
            log(f"row {routing} {b} {pol} {opts} failed: {type(e).__name__}: {e}")
            rows.append(dict(routing=routing, budget=b, policy=pol, error=f"{type(e).__name__}: {e}", **opts))
    res["seconds"] = time.perf_counter() - t_start
    save()
    df = pd.DataFrame(rows)
    df.to_csv(args.out / "gpu_offload.csv", index=False)
    cols = [c for c in ("routing", "budget", "policy", "prefetch", "host", "tok_s", "ms_per_token", "hit_rate",
                        "belady_hit_rate", "GB_per_token", "link_GBps", "floor_ms", "prediction_accuracy",
                        "GB_wasted_per_token", "saved_ms_vs_no_prefetch", "host_experts_per_token",
                        "host_ms_per_token", "host_kernel", "split_bias", "label", "error") if c in df]
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        print(df[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"), flush=True)
    _phases(phase_tables, b0)
    _goals(df, b0)
    log(f"total {res['seconds']:.0f} s")


def _phases(tables: dict, b0: float) -> None:
    """The per-phase profile (host clock, ms per token) of the key rows side by side, and of every row in the
    JSON: where a step's time goes."""
    key = [t for t in tables if t.startswith(("synthetic", f"uniform {b0:.0%} lru", f"mini128 {b0:.0%} lfu"))
           and "per-layer" not in t]
    if not key:
        return
    df = pd.DataFrame({t: tables[t].set_index("phase").ms_per_token for t in key})
    host_ph = [p for p in OffloadedDecoder.PHASES if p in df.index]
    gpu_ph = [p for p in OffloadedDecoder.GPU_PHASES if p in df.index]
    df = pd.concat([df.loc[host_ph], pd.DataFrame([df.loc[host_ph].sum(),
                    pd.Series({t: float(tables[t].ms_per_token_measured.iloc[0]) for t in key})],
                    index=["sum of phases", "measured step"]), df.loc[gpu_ph]])
    log("per-phase profile of OffloadedDecoder.step, ms per token (host clock; GPU time shows up as sync):")
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        log(df.to_string(float_format=lambda v: f"{v:.2f}"))
    log("phases: " + "; ".join(f"{p}: {w}" for p, w in (OffloadedDecoder.PHASE_DOC | OffloadedDecoder.GPU_PHASES).items()))


def _goals(df, b0: float) -> None:
    """The issue's goals against this run's rows."""
    ok = df[df.get("error").isna()] if "error" in df else df
    at = ok[ok.budget == b0]
    uni = at[at.routing == "uniform"]
    if len(uni):
        best = uni.loc[uni.tok_s.idxmax()]
        log(f"GOAL uniform routing at {b0:.0%} >= 25 tok/s: best {best.tok_s:.1f} tok/s "
            f"(policy {best.policy}, prefetch {best.prefetch}, host {best.host}) -> "
            f"{'MET' if best.tok_s >= 25 else 'NOT MET'}")
    mini = at[at.routing == "mini128"]
    if len(mini):
        best = mini.loc[mini.tok_s.idxmax()]
        log(f"GOAL mini128 replay at {b0:.0%} >= 60 tok/s: best {best.tok_s:.1f} tok/s (policy {best.policy}, "
            f"prefetch {best.prefetch}, host {best.host}) -> {'MET' if best.tok_s >= 60 else 'NOT MET'}")
        demand = mini[~mini.prefetch.astype(bool) & (mini.policy != "belady")]
        if len(demand):
            h = demand.loc[demand.hit_rate.idxmax()]
            log(f"GOAL hit rate within 10 points of Belady's ({h.belady_hit_rate:.3f}): best online policy "
                f"{h.policy} {h.hit_rate:.3f} without prefetch -> "
                f"{'MET' if h.belady_hit_rate - h.hit_rate <= 0.10 else 'NOT MET'}")
        pf = mini[mini.prefetch.astype(bool)]
        if len(pf):
            h = pf.loc[pf.hit_rate.idxmax()]
            log(f"     with prefetch (demand hits incl. prefetched): {h.policy} {h.hit_rate:.3f}")


if __name__ == "__main__":
    main()
