"""Issue 15 goals 3-5 as rows of `bench/gpu_decode.py`, on the models it already built (transformers' thinker and
q3lab's Thinker on the same bf16 tensors): prefill, batched decode, traced prefill.

- prefill (`prefill_rows`): one sequence of T = 512 and 4096, q3lab `Thinker.forward` (last_only; experts as
  grouped GEMMs, `q3lab.kernels.grouped_moe`; attention SDPA causal) and q3lab `StaticDecoder.prefill` (the same
  forward captured as a CUDA graph per bucket; the capture timed apart) against transformers' text model + lm_head
  on the last token (its default experts implementation); a compute floor = FLOPs / the bf16 matmul rate measured
  here (a large torch.matmul) and a bytes floor = dense weights + the distinct experts touched (9.4 MB each at the
  real size) over the measured copy bandwidth;
- batched decode (`batch_rows`): B = 1, 4, 16, 64 with one prompt length, q3lab `StaticDecoder` at batch B (CUDA
  graph; several tokens' experts as grouped GEMMs) against transformers `generate` at the same B; step time against
  a bytes floor in which the experts count the DISTINCT experts touched per layer (counted from the routing that
  eager `Thinker.generate` records under `q3lab.record`);
- traced prefill (`traced_rows`): B x T = 64 x 512 under `q3lab.record` against transformers with
  `output_router_logits=True` (its top-k + renormalisation over the logits, copied to the host as a trace needs).

Each function appends its rows to `rows` (printed in the table and saved in the JSON by gpu_decode.py) and keeps
going after a failure of one row (printed; the other rows still run).
"""
from __future__ import annotations

import statistics
import time
import traceback

import torch

from bench.timing import sync as _sync

GB = 1e9


def log(*a) -> None:
    print(*a, flush=True)


def _time(fn, repeats: int, warmup: int = 1) -> float:
    """Median seconds of fn() over `repeats` synchronised calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        _sync()
        t = time.perf_counter()
        fn()
        _sync()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def _guard(label: str, res: dict, fn) -> None:
    """Run one row; a failure is printed and stored, the caller goes on."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - a failing row must not lose the others
        log(f"ROW FAILED {label}: {type(e).__name__}: {e}")
        log(traceback.format_exc(limit=6))
        res.setdefault("failed_rows", []).append(f"{label}: {type(e).__name__}: {e}")
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def profile_to(path, fn, repeats: int = 1) -> dict | None:
    """Kernel-time table (top 25 by device time) of `repeats` calls of fn, written to `path` and its summary
    printed: where the time of a row goes (kernels vs gaps). Returns {"kernels": count, "kernel_ms": device time}
    per call (None without CUDA)."""
    if path is None or not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    ka = prof.key_averages()
    table = ka.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table)
    cuda = [e for e in ka if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in cuda) / repeats
    count = sum(e.count for e in cuda) / repeats
    log(f"profile {path.name}: {count:.0f} kernels, {total / 1e3:.2f} ms of kernel time per call")
    log("\n".join(table.splitlines()[:14]))
    return {"kernels": count, "kernel_ms": total / 1e3}


def matmul_rate(device: str = "cuda", n: int = 8192, repeats: int = 10) -> float:
    """bf16 FLOP/s of one large square torch.matmul (n^3 multiply-adds)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    t = _time(lambda: a @ b, repeats, warmup=3)
    return 2 * n ** 3 / t


def prefill_flops(cfg, T: int, B: int = 1) -> dict:
    """Multiply-add FLOPs (x2) of a prefill of B sequences of T tokens with the lm_head on the last token only:
    projections, router and the A active experts per token, causal attention (QK^T and PV over T(T+1)/2 pairs)."""
    D, H, K, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    L, E, A, I, V = (cfg.num_hidden_layers, cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size,
                     cfg.vocab_size)
    N = B * T
    dense = 2 * N * L * (D * (H + 2 * K) * hd + H * hd * D + D * E)
    experts = 2 * N * L * A * 3 * I * D
    attn = 2 * 2 * B * L * H * hd * T * (T + 1) / 2
    head = 2 * B * V * D
    return {"dense": dense, "experts": experts, "attention": attn, "lm_head": head,
            "total": dense + experts + attn + head}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# -- prefill -----------------------------------------------------------------------------------------------------
def prefill_bytes(cfg, distinct_per_layer, dtype_bytes: int = 2) -> float:
    """Bytes a prefill must read at least: every layer's dense weights and the lm_head (`_dense_bytes`) and each
    DISTINCT expert touched once (gate, up, down: 3*I*D elements; `distinct_per_layer` summed over the layers)."""
    expert = 3 * cfg.moe_intermediate_size * cfg.hidden_size * dtype_bytes
    return _dense_bytes(cfg, dtype_bytes) + float(sum(distinct_per_layer)) * expert


def prefill_rows(hf, ours, cfg, res: dict, rows: list, save, *, lengths=(512, 4096), repeats: int = 3,
                 seed: int = 0, profile_dir=None, bandwidth: float | None = None) -> None:
    """Goal 3: one sequence of each length, q3lab forward and q3lab StaticDecoder.prefill (a CUDA graph per
    bucket; on the CPU the same padded forward without a graph) vs transformers' forward, against a compute
    floor (FLOPs / measured bf16 matmul rate) and a bytes floor (dense weights + the distinct experts the prompt
    touches, read once, over the measured copy bandwidth). With profile_dir: kernel tables of the three at every
    length, with their kernel count, kernel time and the wall time (the difference: launch and host gaps)."""
    import q3lab
    from q3lab.fast.decoders import StaticDecoder
    from q3lab.kernels.grouped_moe import distinct_experts
    from q3lab.oracle import text_model
    dev = ours.device
    size = 8192 if dev.type == "cuda" else 512       # cpu: a smoke test of this script only
    rate = matmul_rate(dev, size)
    res["bf16_matmul_TFLOPs"] = rate / 1e12
    log(f"bf16 matmul rate ({size}^3 torch.matmul): {rate / 1e12:.1f} TFLOP/s")
    bw = bandwidth or res.get("d2d_GBps", 4000) * GB
    lm = text_model(hf)
    g = torch.Generator().manual_seed(seed)
    L, E = cfg.num_hidden_layers, cfg.num_experts
    graphs = True if dev.type == "cuda" else "padded"
    # one decoder for every length, a bucket per length (no pads: the row times the graph, not the padding)
    dec = StaticDecoder(ours, max(lengths) + 1, cuda_graph=False, prefill_graphs=graphs,
                        prefill_buckets=tuple(lengths))
    res.setdefault("prefill_profiles", {})

    def hf_prefill(ids):
        hid = lm(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        return hf.lm_head(hid[:, -1:]).float()

    for T in lengths:
        ids = torch.randint(0, cfg.vocab_size - 16, (1, T), generator=g).to(dev)

        def one(T=T, ids=ids):
            with torch.inference_mode():
                if T == lengths[0]:          # agreement over every position at the shorter length
                    a = ours(ids)[0]
                    b = hf(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()[0]
                    res[f"prefill{T}_logits_rel_diff"] = _rel(a, b)
                    res[f"prefill{T}_top1_agreement"] = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
                    del a, b
                    log(f"prefill T={T}: q3lab vs transformers logits rel. diff "
                        f"{res[f'prefill{T}_logits_rel_diff']:.2e}, top-1 agreement "
                        f"{res[f'prefill{T}_top1_agreement']:.3f}")
                theirs = hf_prefill(ids)[0, -1]
                eager_last = ours(ids, last_only=True)[0, -1]
                last_rel = _rel(eager_last, theirs)
                with q3lab.record(ours) as rec:      # the routing: distinct experts per layer for the bytes floor
                    ours(ids, last_only=True)
                call = rec._calls()[0]
                distinct = distinct_experts(torch.stack([call.topk_ids[i] for i in range(L)]).reshape(L, -1).to(dev),
                                            E).float()
                del rec, call
                t_hf = _time(lambda: hf_prefill(ids), repeats)
                t_q = _time(lambda: ours(ids, last_only=True), repeats)
                # the graphed prefill: the first call warms up, captures and replays (timed apart)
                # memory: reserved after empty_cache before and after (torch.cuda.graph empties the cache itself,
                # and the graph's private pool is not released by it): the pool + the bucket's buffers
                _sync()
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                mem0 = torch.cuda.memory_reserved() if dev.type == "cuda" else 0
                t0 = time.perf_counter()
                got = dec.prefill(ids)[0]
                _sync()
                capture_s = time.perf_counter() - t0
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                pool_gb = (torch.cuda.memory_reserved() - mem0) / GB if dev.type == "cuda" else float("nan")
                graph_rel_eager, graph_rel_hf = _rel(got, eager_last), _rel(got, theirs)
                t_g = _time(lambda: dec.prefill(ids), repeats)
                log(f"prefill T={T}: StaticDecoder.prefill bucket {dec.prefill_bucket(T)}, first call (warm-up + "
                    f"capture + replay) {capture_s:.2f} s, memory reserved {pool_gb:+.2f} GB; last logits vs eager "
                    f"{graph_rel_eager:.2e}, vs transformers {graph_rel_hf:.2e}; distinct experts per layer "
                    f"{distinct.mean().item():.1f}")
                if profile_dir is not None:
                    for name, fn, wall in (("q3lab", lambda: ours(ids, last_only=True), t_q),
                                           ("q3lab_graph", lambda: dec.prefill(ids), t_g),
                                           ("transformers", lambda: hf_prefill(ids), t_hf)):
                        pr = profile_to(profile_dir / f"profile_prefill{T}_{name}.txt", fn)
                        if pr is not None:
                            pr |= {"wall_ms": wall * 1e3, "kernel_over_wall": pr["kernel_ms"] / (wall * 1e3)}
                            res["prefill_profiles"][f"T={T} {name}"] = pr
                            log(f"profile T={T} {name}: {pr['kernels']:.0f} kernels, {pr['kernel_ms']:.2f} ms "
                                f"kernel time of {wall * 1e3:.2f} ms wall ({pr['kernel_over_wall']:.0%}; the rest "
                                f"is launch/host gaps)")
            fl = prefill_flops(cfg, T)
            floor = fl["total"] / rate
            need = prefill_bytes(cfg, distinct.tolist())
            bfloor = need / bw
            for system, t, extra in (
                    (f"transformers forward ({res.get('experts_implementation', '?')})", t_hf, {}),
                    ("q3lab Thinker.forward (grouped experts, SDPA)", t_q, {}),
                    ("q3lab StaticDecoder.prefill (CUDA graph per bucket)" if graphs is True else
                     "q3lab StaticDecoder.prefill (bucket path, no graph: CPU smoke)", t_g,
                     {"capture_s": capture_s, "graph_pool_GB": pool_gb, "last_logits_rel_diff_vs_eager":
                      graph_rel_eager})):
                rows.append(dict(system=f"prefill T={T}: {system}", prefill_ms=t * 1e3, tok_s=T / t,
                                 compute_floor_ms=floor * 1e3, of_floor=t / floor, bytes_floor_ms=bfloor * 1e3,
                                 of_bytes_floor=t / bfloor, speedup_vs_transformers=t_hf / t,
                                 last_logits_rel_diff=graph_rel_hf if extra else last_rel,
                                 distinct_experts_per_layer=distinct.mean().item(), GB_floor=need / GB, **extra))
                log(rows[-1])
            save()
        _guard(f"prefill T={T}", res, one)
    del dec


# -- batched decode ----------------------------------------------------------------------------------------------
def _dense_bytes(cfg, dtype_bytes: int = 2) -> float:
    D, H, K, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    L, E, V = cfg.num_hidden_layers, cfg.num_experts, cfg.vocab_size
    return (L * (D * H * hd + 2 * D * K * hd + H * hd * D + 2 * hd + 2 * D + E * D) + V * D + D) * dtype_bytes


def batch_rows(hf, ours, cfg, res: dict, rows: list, save, *, batches=(1, 4, 16, 64), prompt: int = 32,
               new_tokens: int = 16, repeats: int = 2, bandwidth: float | None = None, compile: bool = True,
               fused: bool = True, seed: int = 0, profile_dir=None) -> None:
    """Goal 4: tokens/s of q3lab StaticDecoder at batch B vs transformers generate at B; step vs a bytes floor."""
    import q3lab
    from q3lab.fast.decoders import StaticDecoder
    from q3lab.kernels.grouped_moe import distinct_experts
    bw = bandwidth or res.get("d2d_GBps", 4000) * GB
    L, E, A, I, D = (cfg.num_hidden_layers, cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size,
                     cfg.hidden_size)
    expert_bytes = 3 * I * D * 2
    n = new_tokens
    g = torch.Generator().manual_seed(seed)
    dec = None
    for B in batches:
        ids = torch.randint(0, cfg.vocab_size - 16, (B, prompt), generator=g).to(ours.device)

        def one(B=B, ids=ids):
            nonlocal dec

            def hf_gen(k):
                return hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=k,
                                   do_sample=False, pad_token_id=0)
            with torch.inference_mode():
                t1 = _time(lambda: hf_gen(1), repeats)
                tn = _time(lambda: hf_gen(n), repeats)
                hf_step = (tn - t1) / (n - 1)
                with q3lab.record(ours) as rec:                  # eager reference tokens + the routing
                    want = ours.generate(ids, n)
                call = [c for c in rec._calls() if c.ids.shape[1] == 1]   # the decode steps
                steps = torch.stack([torch.stack([c.topk_ids[i] for i in range(L)]) for c in call])  # [S, L, B, A]
                distinct = distinct_experts(steps.reshape(len(call), L, -1), E).float()    # [S, L]
                t = time.perf_counter()
                if dec is None:
                    dec = StaticDecoder(ours, prompt + n + 1, batch=B, compile=compile, fused=fused)
                got = dec.generate(ids, n)                         # (re)allocates + captures for this B
                built = time.perf_counter() - t
                same_rows = float((got == want).all(1).float().mean())
                prefix = float((got[:, prompt:] == want[:, prompt:]).int().cumprod(1).sum(1).float().mean())
                _time(lambda: dec.generate(ids, n), 1, warmup=0)
                pipe = []
                for _ in range(repeats):
                    dec.prefill(ids)
                    _sync()
                    t0 = time.perf_counter()
                    for _ in range(n - 1):
                        dec.step()
                    _sync()
                    pipe.append((time.perf_counter() - t0) / (n - 1))
                step_s = statistics.median(pipe)
                if profile_dir is not None and B == batches[-1]:
                    dec.prefill(ids)
                    profile_to(profile_dir / f"profile_batch{B}_step.txt", dec.step, repeats=3)
            kv = B * L * 2 * cfg.num_key_value_heads * cfg.head_dim * (prompt + n / 2) * 2
            need = _dense_bytes(cfg) + distinct.mean().item() * L * expert_bytes + kv
            floor = need / bw
            rows.append(dict(system=f"batch B={B}: transformers generate ({res.get('experts_implementation', '?')})",
                             ms_per_token=hf_step * 1e3, tok_s=B / hf_step))
            log(rows[-1])
            rows.append(dict(system=f"batch B={B}: q3lab StaticDecoder (graph, grouped experts"
                                    f"{', compiled' if compile else ''}{', fused' if fused else ''})",
                             ms_per_token=step_s * 1e3, tok_s=B / step_s, speedup_vs_transformers=hf_step / step_s,
                             bytes_floor_ms=floor * 1e3, of_floor=step_s / floor,
                             distinct_experts_per_layer=distinct.mean().item(),
                             distinct_experts_max=distinct.max().item(), GB_per_step_floor=need / GB,
                             rows_equal_to_eager=same_rows, tokens_equal_prefix_mean=prefix, build_s=built))
            log(rows[-1])
            save()
        _guard(f"batch B={B}", res, one)
    del dec


# -- traced prefill ----------------------------------------------------------------------------------------------
def traced_rows(hf, ours, cfg, res: dict, rows: list, save, *, B: int = 64, T: int = 512, repeats: int = 2,
                seed: int = 0) -> None:
    """Goal 5: B x T tokens under q3lab.record vs transformers with output_router_logits=True (top-k to host)."""
    import q3lab
    from q3lab.oracle import text_model
    lm = text_model(hf)
    L, A = cfg.num_hidden_layers, cfg.num_experts_per_tok
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size - 16, (B, T), generator=g).to(ours.device)
    N = B * T

    def one():
        def hf_traced():
            out = lm(input_ids=ids, attention_mask=torch.ones_like(ids), output_router_logits=True)
            picked = []
            for lg in out.router_logits:
                w, e = torch.topk(torch.softmax(lg.float(), -1), A, dim=-1)
                picked.append(((w / w.sum(-1, keepdim=True)).cpu(), e.cpu()))
            return picked

        def q_traced(frame: bool):
            with q3lab.record(ours) as rec:
                ours(ids, last_only=True)
            call = rec._calls()[0]
            ex = torch.stack([call.topk_ids[i] for i in range(L)]).cpu()        # [L, N, A]: the host copy
            torch.stack([call.topk_weights[i] for i in range(L)]).cpu()
            return (rec.to_frame() if frame else None), ex

        with torch.inference_mode():
            t_hf = _time(hf_traced, repeats)
            t_q = _time(lambda: q_traced(False), repeats)
            t_qf = _time(lambda: q_traced(True), 1, warmup=0)
            picked = hf_traced()
            _, ex = q_traced(False)
        theirs = torch.stack([e for _, e in picked]).view(L, N, A).sort(-1).values
        same = (ex.view(L, N, A).sort(-1).values == theirs).all(-1).float().mean().item()
        mem = torch.cuda.max_memory_allocated() / GB if torch.cuda.is_available() else float("nan")
        rows.append(dict(system=f"traced {B}x{T}: transformers output_router_logits=True (top-k to host)",
                         seconds=t_hf, tok_s=N / t_hf))
        log(rows[-1])
        rows.append(dict(system=f"traced {B}x{T}: q3lab forward under q3lab.record (ids+weights to host)",
                         seconds=t_q, tok_s=N / t_q, speedup_vs_transformers=t_hf / t_q,
                         expert_sets_equal_to_transformers=same, peak_gpu_GB=mem))
        log(rows[-1])
        rows.append(dict(system=f"traced {B}x{T}: q3lab record + to_frame() (pandas, {N * L * A:,} rows)",
                         seconds=t_qf, tok_s=N / t_qf, speedup_vs_transformers=t_hf / t_qf))
        log(rows[-1])
        save()
    _guard(f"traced {B}x{T}", res, one)


GROUPS = ("prefill", "batch", "traced")


def run(groups, hf, ours, cfg, res: dict, rows: list, save, *, prompt: int = 32, new_tokens: int = 16,
        repeats: int = 3, small: bool = False, profile_dir=None) -> None:
    """The rows of `groups` (a subset of GROUPS) in order, each group robust to the failure of one row. small: a
    CPU smoke test of this code (short sequences, no torch.compile). profile_dir: kernel tables of every prefill
    length (eager, graphed, transformers) and the largest batch's step go there (CUDA only)."""
    if "prefill" in groups:
        prefill_rows(hf, ours, cfg, res, rows, save, repeats=repeats, lengths=(32, 64) if small else (512, 4096),
                     profile_dir=profile_dir)
    if "batch" in groups:
        batch_rows(hf, ours, cfg, res, rows, save, prompt=prompt, new_tokens=new_tokens, repeats=min(repeats, 2),
                   batches=(1, 4) if small else (1, 4, 16, 64), compile=not small, profile_dir=profile_dir)
    if "traced" in groups:
        traced_rows(hf, ours, cfg, res, rows, save, repeats=min(repeats, 2), B=4 if small else 64,
                    T=32 if small else 512)
