"""q3lab vs transformers' Qwen3-Omni thinker on the CPU: greedy decode and prefill tokens/s, same weights.

    .venv/bin/python bench/cpu_decode.py [--checkpoint DIR ...] [--new-tokens 128] [--prefill 512] [--repeats 3]

Both models hold the same float32 weights (q3lab.load, and transformers' thinker filled by
q3lab.reference.load_reference_generator); greedy outputs are checked equal before anything is timed.
Reports medians of the repeats and ratios measured in the same run.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch

import q3lab
from q3lab.reference import load_reference_generator

ROOT = Path(__file__).resolve().parent.parent


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench(path: Path, new_tokens: int, prefill: int, repeats: int, cache: int | None) -> list[dict]:
    ours = q3lab.load(path)
    ref = load_reference_generator(path)
    V = ours.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, min(V, 4000), (1, 16), generator=g)
    long = torch.randint(0, min(V, 4000), (1, prefill), generator=g)
    a = ours.generate(prompt, new_tokens)
    b = ref.generate(input_ids=prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    equal = a.tolist() == b.tolist()
    rows = []
    t_ref = timed(lambda: ref.generate(input_ids=prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                       do_sample=False), repeats)
    t_ours = timed(lambda: ours.generate(prompt, new_tokens), repeats)
    rows.append(dict(checkpoint=path.name, what=f"decode {new_tokens} tok", reference_tok_s=new_tokens / t_ref,
                     q3lab_tok_s=new_tokens / t_ours, ratio=t_ref / t_ours, greedy_equal=equal))
    with torch.no_grad():
        p_ref = timed(lambda: ref(input_ids=long, logits_to_keep=1), repeats)
        p_ours = timed(lambda: ours(long, last_only=True), repeats)
    rows.append(dict(checkpoint=path.name, what=f"prefill T={prefill}", reference_tok_s=prefill / p_ref,
                     q3lab_tok_s=prefill / p_ours, ratio=p_ref / p_ours, greedy_equal=equal))
    if cache:
        cached = q3lab.load(path, experts=q3lab.ExpertCache(capacity=cache))
        c = cached.generate(prompt, new_tokens)
        t_c = timed(lambda: cached.generate(prompt, new_tokens), repeats)
        rows.append(dict(checkpoint=path.name, what=f"decode {new_tokens} tok, cache {cache} experts",
                         reference_tok_s=new_tokens / t_ref, q3lab_tok_s=new_tokens / t_c, ratio=t_ref / t_c,
                         greedy_equal=c.tolist() == a.tolist()))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", nargs="*", type=Path)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache", type=int, default=0, help="also time the expert cache with this capacity")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = args.checkpoint or []
    if not paths:
        if (ROOT / "data" / "mini" / "config.json").exists():
            paths.append(ROOT / "data" / "mini")
        small = ROOT / "out" / "bench" / "synth-small"
        if not (small / "config.json").exists():
            q3lab.synth(small, "small", seed=0)
        paths.append(small)
    rows = [r for p in paths for r in bench(p, args.new_tokens, args.prefill, args.repeats, args.cache)]
    import pandas as pd
    table = pd.DataFrame(rows)
    text = table.to_string(index=False, float_format=lambda v: f"{v:.2f}")
    print(text)
    header = (f"\n## CPU decode and prefill vs transformers ({date.today()}, {platform.machine()}, "
              f"{torch.get_num_threads()} threads, torch {torch.__version__})\n\n"
              f"`.venv/bin/python bench/cpu_decode.py --new-tokens {args.new_tokens} --prefill {args.prefill} "
              f"--repeats {args.repeats}{f' --cache {args.cache}' if args.cache else ''}`; medians of "
              f"{args.repeats} repeats, float32, batch 1; ratio = q3lab speed / reference speed.\n\n")
    with open(args.results, "a") as f:
        f.write(header + "```\n" + text + "\n```\n")


if __name__ == "__main__":
    main()
