"""q3lab vs transformers' Qwen3-Omni thinker on the CPU: greedy decode and prefill tokens/s, same weights.

    flock /tmp/q3lab-cpu.lock .venv/bin/python bench/cpu_decode.py [--checkpoint DIR ...] [--new-tokens 128]
        [--prefill 512] [--repeats 5] [--cache all,25%] [--threads 2] [--results bench/RESULTS.md]

Both models hold the same float32 weights (q3lab.load, and transformers' thinker filled by
q3lab.oracle.load_reference_generator); greedy outputs are checked equal before anything is timed, and the
expert-cache models' outputs against the resident model's. Repeats are interleaved (reference, q3lab, each
cache, in turn) so that load from other jobs on the machine hits all of them alike; the table gives medians
and ratios measured in this run. Cache capacities: a count of experts, a percentage of all experts, or "all"
(every expert fits: the cache's bookkeeping without misses after the first token).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import q3lab
from q3lab.oracle import load_reference_generator

ROOT = Path(__file__).resolve().parent.parent


def capacity(spec: str, total: int) -> int:
    """'all' -> total, '25%' -> a quarter of total, '256' -> 256."""
    if spec == "all":
        return total
    if spec.endswith("%"):
        return max(1, round(total * float(spec[:-1]) / 100))
    return int(spec)


def one_run(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench(path: Path, new_tokens: int, prefill: int, repeats: int, caches: list[str],
          notes: list[str]) -> list[dict]:
    ours = q3lab.load(path)
    ref = load_reference_generator(path)
    cfg = ours.config
    total = cfg.num_hidden_layers * cfg.num_experts
    cached = {}
    for spec in caches:
        cap = capacity(spec, total)
        cached[f"cache {cap} of {total} experts"] = q3lab.load(path, experts=q3lab.ExpertCache(capacity=cap))
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, min(cfg.vocab_size, 4000), (1, 16), generator=g)
    long = torch.randint(0, min(cfg.vocab_size, 4000), (1, prefill), generator=g)

    def ref_decode():
        return ref.generate(input_ids=prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    def ref_prefill():
        with torch.no_grad():
            return ref(input_ids=long, logits_to_keep=1)

    def our_prefill(m):
        with torch.inference_mode():
            return m(long, last_only=True)

    a = ours.generate(prompt, new_tokens)       # also the warm-up of every model below
    equal = {"q3lab": a.tolist() == ref_decode().tolist()}
    for name, m in cached.items():
        equal[name] = m.generate(prompt, new_tokens).tolist() == a.tolist()
    ref_prefill()
    for m in [ours, *cached.values()]:
        our_prefill(m)
    decode = {k: [] for k in ["reference", "q3lab", *cached]}
    pre = {k: [] for k in ["reference", "q3lab", *cached]}
    for _ in range(repeats):
        decode["reference"].append(one_run(ref_decode))
        pre["reference"].append(one_run(ref_prefill))
        for name, m in [("q3lab", ours), *cached.items()]:
            decode[name].append(one_run(lambda: m.generate(prompt, new_tokens)))
            pre[name].append(one_run(lambda: our_prefill(m)))
    rows = []
    for what, times, n in (("decode", decode, new_tokens), ("prefill", pre, prefill)):
        t_ref = statistics.median(times["reference"])
        for name in ["q3lab", *cached]:
            t = statistics.median(times[name])
            rows.append(dict(checkpoint=path.name, what=f"{what} {'%d tok' % n if what == 'decode' else 'T=%d' % n}",
                             q3lab=name.replace("q3lab", "resident"), reference_tok_s=n / t_ref, q3lab_tok_s=n / t,
                             ratio=t_ref / t, q3lab_range=f"{n / max(times[name]):.0f}-{n / min(times[name]):.0f}",
                             tokens_equal=equal[name]))
    for name, m in cached.items():
        s = m.experts_provider.summary()
        notes.append(f"{path.name}, {name}: hit rate {s['hit_rate']:.3f} over the whole run (decode and prefill), "
                     f"{s['misses']} misses, {s['bytes_loaded'] / 2**20:.0f} MiB loaded in {s['load_seconds']:.2f} s")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", nargs="*", type=Path)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cache", default="all,25%",
                    help="expert-cache capacities to time, comma-separated: N experts, P%% of all, or all; '' for none")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    paths = args.checkpoint or []
    if not paths:
        if (ROOT / "data" / "mini" / "config.json").exists():
            paths.append(ROOT / "data" / "mini")
        small = ROOT / "out" / "bench" / "synth-small"
        if not (small / "config.json").exists():
            q3lab.synth(small, "small", seed=0)
        paths.append(small)
    caches = [c.strip() for c in args.cache.split(",") if c.strip()]
    t0 = time.perf_counter()
    notes: list[str] = []
    rows = [r for p in paths for r in bench(p, args.new_tokens, args.prefill, args.repeats, caches, notes)]
    import pandas as pd
    text = pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.2f}")
    print(text)
    print("\n".join(notes))
    cmd = " ".join(["flock /tmp/q3lab-cpu.lock .venv/bin/python bench/cpu_decode.py",
                    *(f"--checkpoint {p}" for p in args.checkpoint or []),
                    f"--new-tokens {args.new_tokens} --prefill {args.prefill} --repeats {args.repeats}",
                    f"--cache '{args.cache}' --threads {args.threads}"])
    header = (f"\n## CPU decode and prefill vs transformers ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)\n\n"
              f"{platform.platform()}; {platform.processor() or platform.machine()}; "
              f"{torch.get_num_threads()} torch threads; torch {torch.__version__}; Python "
              f"{platform.python_version()}. Took {time.perf_counter() - t0:.0f} s.\n\n    {cmd}\n\n"
              f"float32, batch 1, greedy; medians of {args.repeats} interleaved repeats; ratio = q3lab speed / "
              f"reference speed in this run; q3lab_range = slowest-fastest repeat (tok/s); tokens_equal: greedy "
              f"tokens equal to the reference's (resident) or to the resident model's (caches).\n\n")
    with open(args.results, "a") as f:
        f.write(header + "```\n" + text + "\n```\n\n" + "".join(f"- {n}\n" for n in notes))
    print(f"appended to {args.results}")


if __name__ == "__main__":
    main()
