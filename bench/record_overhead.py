"""Cost of `q3lab.record` on forward time: prefill and greedy decode, with and without recording.

    .venv/bin/python bench/record_overhead.py [--preset small] [--layers N] [--device cpu|cuda]
                                              [--dtype fp32|bf16] [--prefill 256] [--new-tokens 32] [--repeats 15]

The model has random weights made in memory (no checkpoint on disk) with a `q3lab.synth` preset's
dimensions; only the layer count may be cut (recording costs per layer, so the ratio does not depend on it).
Variants run interleaved (base, top-k, top-k + probs, base, ...) so that drift hits all of them alike; each
number is the median of `--repeats`, and the overhead is median(recorded) / median(base) - 1 from the same
run. `to_frame()` is timed separately: it is post-processing, not forward time. Appends the table to
bench/RESULTS.md with the machine and date.
"""
from __future__ import annotations

import argparse
import gc
import platform
import statistics
import time
import zlib
from datetime import date
from pathlib import Path

import pandas as pd
import torch

import q3lab
from q3lab.runtime.recording import record
from q3lab.weights.synthetic import preset_config

ROOT = Path(__file__).resolve().parent.parent


class RandomSource:
    """A weight source (the `Checkpoint`/`Store` reading interface) of seeded random tensors, made on `device`."""

    def __init__(self, config, device: str, seed: int = 0):
        self.config, self.path, self.tokenizer_dir = config, Path(f"<random {device}>"), None
        self.device, self.seed = device, seed
        self.shapes = config.expected_tensors()

    def _rand(self, name: str, shape) -> torch.Tensor:
        g = torch.Generator(device=self.device).manual_seed(zlib.crc32(f"{self.seed}:{name}".encode()))
        t = torch.randn(shape, generator=g, device=self.device) * 0.02
        return t + 1.0 if name.endswith("norm.weight") else t

    def get(self, name: str) -> torch.Tensor:
        return self._rand(name, self.shapes[name])

    def expert(self, layer: int, e: int):
        p = f"model.layers.{layer}.mlp.experts.{e}."
        return tuple(self._rand(p + w, self.shapes[p + w]) for w in ("gate_proj.weight", "up_proj.weight",
                                                                     "down_proj.weight"))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(variants: dict, repeats: int, device: str) -> dict[str, list[float]]:
    """Seconds per call of each variant, run round-robin after one warm-up each."""
    for fn in variants.values():
        fn()
    times = {k: [] for k in variants}
    names = list(variants)
    for r in range(repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:   # rotate who goes first
            gc.collect()                 # no collector pause inside a timed call
            _sync(device)
            t = time.perf_counter()
            variants[k]()
            _sync(device)
            times[k].append(time.perf_counter() - t)
    return times


def bench(model, device: str, prefill: int, new_tokens: int, repeats: int) -> pd.DataFrame:
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    long = torch.randint(0, V, (1, prefill), generator=g).to(device)
    prompt = torch.randint(0, V, (1, 16), generator=g).to(device)
    frames = {}

    def recorded(fn, probs: bool, key: str):
        def run():
            with record(model, probs=probs) as rec:
                fn()
            frames[key] = rec
        return run

    def prefill_fn():
        with torch.inference_mode():
            model(long, last_only=True)

    def decode_fn():
        model.generate(prompt, new_tokens)

    rows = []
    for what, fn, tokens in ((f"prefill T={prefill}", prefill_fn, prefill),
                             (f"generate 16+{new_tokens}", decode_fn, 16 + new_tokens - 1)):
        times = interleaved({"base": fn, "topk": recorded(fn, False, "topk"),
                             "topk+probs": recorded(fn, True, "probs")}, repeats, device)
        base = statistics.median(times["base"])
        for k, ts in times.items():
            med = statistics.median(ts)
            rows.append(dict(workload=what, variant=k, median_ms=1e3 * med, min_ms=1e3 * min(ts),
                             overhead_pct=100 * (med / base - 1)))
        t = time.perf_counter()
        f = frames["topk"].to_frame()
        rows.append(dict(workload=what, variant=f"to_frame ({len(f):,} rows)", median_ms=1e3 * (time.perf_counter() - t),
                         min_ms=float("nan"), overhead_pct=float("nan")))
        assert f[["prompt", "token_index"]].drop_duplicates().shape[0] == tokens
    return pd.DataFrame(rows)


def hook_cost(model, device: str, calls: int = 4000) -> pd.DataFrame:
    """Microseconds one layer's recording adds (its top-k ids and weights hook points, called directly),
    set against the base decode time per token: a direct reading of what the end-to-end numbers blur."""
    from q3lab.runtime.recording import _Call
    mlp = model.model.layers[0].mlp
    k = model.config.num_experts_per_tok
    idx = torch.zeros(1, k, dtype=torch.long, device=device)
    w = torch.zeros(1, k, dtype=model.dtype, device=device)

    def loop() -> float:
        t = time.perf_counter()
        for _ in range(calls):
            mlp.hook_topk_ids(idx)
            mlp.hook_topk_weights(w)
        return (time.perf_counter() - t) / calls * 1e6

    base = statistics.median(loop() for _ in range(5))
    with record(model) as rec:
        rec._current = _Call([0], 0, idx, idx, None, None)     # as inside a forward call
        hooked = statistics.median(loop() for _ in range(5))
    return pd.DataFrame([dict(workload="one layer's 2 hook points", variant=f"base ({base:.2f} us)",
                              median_ms=base / 1e3, min_ms=float("nan"), overhead_pct=float("nan")),
                         dict(workload="one layer's 2 hook points", variant=f"topk ({hooked:.2f} us)",
                              median_ms=hooked / 1e3, min_ms=float("nan"), overhead_pct=float("nan"))])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small", choices=["tiny", "small", "medium", "full"])
    ap.add_argument("--layers", type=int, help="cut the preset's layer count")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = preset_config(args.preset, layers=args.layers)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = q3lab.load(RandomSource(cfg, args.device), device=args.device, dtype=dtype)
    table = bench(model, args.device, args.prefill, args.new_tokens, args.repeats)
    hooks = hook_cost(model, args.device)
    per_layer_ms = hooks["median_ms"].iloc[1] - hooks["median_ms"].iloc[0]
    dec = table[(table["workload"].str.startswith("generate")) & (table["variant"] == "base")]["median_ms"].item()
    per_call_ms = dec / args.new_tokens       # generate makes new_tokens forward calls (1 prefill + decodes)
    est = dict(workload="estimate per forward call", variant=f"{cfg.num_hidden_layers} layers x hooks",
               median_ms=cfg.num_hidden_layers * per_layer_ms, min_ms=float("nan"),
               overhead_pct=100 * cfg.num_hidden_layers * per_layer_ms / per_call_ms)
    table = pd.concat([table, hooks, pd.DataFrame([est])], ignore_index=True)
    text = table.to_string(index=False, float_format=lambda v: f"{v:.2f}")
    if args.device.startswith("cuda"):
        machine = f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    else:
        machine = f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"
    dims = (f"{args.preset} preset: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_experts} "
            f"experts, top-{cfg.num_experts_per_tok}")
    print(f"{machine}; {dims}; {args.dtype}\n{text}")
    cmd = (f"python bench/record_overhead.py --preset {args.preset}"
           f"{f' --layers {args.layers}' if args.layers else ''} --device {args.device} --dtype {args.dtype} "
           f"--prefill {args.prefill} --new-tokens {args.new_tokens} --repeats {args.repeats}")
    header = (f"\n## Recording overhead, q3lab.record ({date.today()}, {machine})\n\n"
              f"`{cmd}`; {dims}, {args.dtype}, batch 1, random weights. Medians of {args.repeats} interleaved "
              f"repeats; overhead = median(recorded) / median(base) - 1, same run. Goal: top-k under 5%.\n\n")
    with open(args.results, "a") as f:
        f.write(header + "```\n" + text + "\n```\n")


if __name__ == "__main__":
    main()
