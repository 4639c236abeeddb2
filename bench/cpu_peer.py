"""q3lab against llama.cpp on the CPU, on identical weights: greedy agreement, prefill and decode tok/s, peak RSS.

    .venv/bin/python bench/cpu_peer.py [--checkpoint DIR ...] [--synth-medium DIR] [--dtypes f32,bf16]
        [--rounds 3] [--threads 2] [--new-tokens 64] [--prefill 512] [--work DIR] [--results bench/RESULTS.md]

Needs llama-cpp-python (pip install llama-cpp-python==0.3.36: it builds llama.cpp from source; not in CI).
Each checkpoint is exported with `q3lab export` (q3lab.weights.gguf.export_gguf) once per dtype; llama.cpp reads
that file and q3lab reads the checkpoint itself, in the same dtype (bf16 source values are exact in both).
Every measurement runs in a fresh process (so peak RSS belongs to one engine and one dtype), with the same
thread count and the same prompt ids; rounds are interleaved (round r runs every dtype and both engines, the
engine order alternating) so that load from other jobs hits both alike: the table gives medians and ratios.
KV caches are matched to the dtype (llama.cpp's default is f16: type_k/type_v are set to F32 or BF16).

decode = N greedy tokens after a 16-token prompt (the prompt's prefill included, for both), tok/s = N / time;
decode steps = the N-1 one-token steps after the first new token (prompt excluded), tok/s = (N-1) / time.
prefill = one forward over T tokens, logits of the last only.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT_LEN = 16
GGML_KV = {"f32": 0, "bf16": 30}   # GGML_TYPE_F32, GGML_TYPE_BF16


def prompt_ids(vocab: int, n: int, seed: int) -> list[int]:
    """Deterministic ids below min(vocab, 4000): ordinary tokens of every tokenizer here (no specials)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, min(vocab, 4000), (n,), generator=g).tolist()


# -- the worker: one engine, one dtype, in its own process ---------------------------------------------
def timed(prefill, decode, repeats: int, stamps: list[float]) -> dict:
    """Fastest of `repeats` prefills and decodes after one warm-up prefill: with other jobs on the cores, the
    fastest run is the one least disturbed (the median over rounds of these is what the table reports)."""
    prefill()
    pre, dec, steps, tokens = [], [], [], None
    for _ in range(repeats):
        t = time.perf_counter()
        prefill()
        pre.append(time.perf_counter() - t)
        t = time.perf_counter()
        out = decode()
        dec.append(time.perf_counter() - t)
        steps.append(stamps[-1] - stamps[0])   # the N-1 one-token steps after the first token
        if tokens is not None and out != tokens:
            raise SystemExit(f"greedy tokens differ between repeats of one process: {tokens} vs {out}")
        tokens = out
    return dict(prefill_s=min(pre), decode_s=min(dec), steps_s=min(steps), tokens=tokens,
                load_avg=os.getloadavg()[0])
def work_q3lab(a) -> dict:
    import torch

    import q3lab
    torch.set_num_threads(a.threads)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    t0 = time.perf_counter()
    m = q3lab.load(a.model, dtype=dtype, progress=False)
    from q3lab.runtime import step
    # q3lab-torch: Q3LAB_CPU_KERNELS=0 in its environment (run_worker); a prefill and a decode step may differ
    pre, dec = (step.kernels_for(m.device, m.dtype, m.config.hidden_size, decode=d).name for d in (False, True))
    ks = pre if pre == dec else f"{pre} prefill, {dec} decode"
    if a.engine == "q3lab-torch" and ks != "torch":
        raise SystemExit(f"{a.engine} worker runs the {ks} kernel set")
    load_s = time.perf_counter() - t0
    prompt = torch.tensor([a.prompt])
    long = torch.tensor([a.long])
    stamps: list[float] = []   # when each new token came out (the first one after the prompt's forward)

    def prefill():
        with torch.inference_mode():
            m(long, last_only=True)

    def decode():
        stamps.clear()
        out = m.generate(prompt, a.new_tokens, streamer=lambda tok: stamps.append(time.perf_counter()))
        return out[0, len(a.prompt):].tolist()

    m.generate(prompt, 4)   # warm-up
    return dict(load_s=load_s, kernels=ks, **timed(prefill, decode, a.repeats, stamps))


def work_llama(a) -> dict:
    import numpy as np
    from llama_cpp import Llama
    t0 = time.perf_counter()
    llm = Llama(a.model, n_ctx=max(len(a.long), len(a.prompt) + a.new_tokens) + 16, n_batch=len(a.long),
                n_ubatch=len(a.long), n_threads=a.threads, n_threads_batch=a.threads, type_k=GGML_KV[a.dtype],
                type_v=GGML_KV[a.dtype], verbose=False)
    load_s = time.perf_counter() - t0
    n_vocab = llm.n_vocab()

    def prefill():
        llm.reset()
        llm.eval(a.long)

    stamps: list[float] = []

    def decode():
        stamps.clear()
        llm.reset()
        llm.eval(a.prompt)
        out = []
        for i in range(a.new_tokens):
            logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))
            out.append(int(logits.argmax()))
            stamps.append(time.perf_counter())
            if i + 1 < a.new_tokens:    # as q3lab's generate: no forward after the last token
                llm.eval([out[-1]])
        return out

    llm.reset()
    llm.eval(a.prompt[:4])   # warm-up
    return dict(load_s=load_s, **timed(prefill, decode, a.repeats, stamps))


def worker(a) -> None:
    res = (work_llama if a.engine == "llama.cpp" else work_q3lab)(a)
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux
    print("RESULT " + json.dumps(res))


def run_worker(engine: str, model: Path, dtype: str, prompt: list[int], long: list[int], new_tokens: int,
               threads: int, repeats: int) -> dict:
    spec = json.dumps(dict(prompt=prompt, long=long))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               Q3LAB_CPU_KERNELS="0" if engine == "q3lab-torch" else "1")
    cmd = [sys.executable, __file__, "--worker", engine, "--model", str(model), "--dtype", dtype,
           "--new-tokens", str(new_tokens), "--threads", str(threads), "--repeats", str(repeats), "--spec", spec]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not lines:
        raise SystemExit(f"{engine} {dtype} on {model} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# -- the driver ---------------------------------------------------------------------------------------
def first_divergence(a: list[int], b: list[int]) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"step {i} ({x} vs {y})"
    return f"none in {min(len(a), len(b))}"


def bench(ckpt: Path, dtypes: list[str], rounds: int, threads: int, new_tokens: int, prefill: int,
          work: Path, kernels: bool = False, repeats: int = 3) -> tuple[list[dict], list[str]]:
    import q3lab
    from q3lab.weights.gguf import export_gguf
    cfg = q3lab.open_weights(ckpt).config
    notes = []
    ggufs = {}
    for dt in dtypes:
        out = work / f"{ckpt.name}-{dt}.gguf"
        t = time.perf_counter()
        export_gguf(ckpt, out, dtype=dt, progress=False)
        notes.append(f"{ckpt.name}: q3lab export --dtype {dt}: {out.stat().st_size / 2**20:.0f} MiB in "
                     f"{time.perf_counter() - t:.1f} s")
        ggufs[dt] = out
    prompt = prompt_ids(cfg.vocab_size, PROMPT_LEN, 0)
    long = prompt_ids(cfg.vocab_size, prefill, 1)
    res: dict[tuple[str, str], list[dict]] = {}
    for r in range(rounds):
        for dt in dtypes:
            engines = ["llama.cpp", "q3lab"] + (["q3lab-torch"] if kernels else [])
            if r % 2:
                engines.reverse()
            for eng in engines:
                model = ggufs[dt] if eng == "llama.cpp" else ckpt
                one = run_worker(eng, model, dt, prompt, long, new_tokens, threads, repeats)
                res.setdefault((eng, dt), []).append(one)
                print(f"  round {r + 1} {ckpt.name} {dt:>4} {eng:>11}: decode {new_tokens / one['decode_s']:7.1f} "
                      f"tok/s, steps {(new_tokens - 1) / one['steps_s']:7.1f} tok/s, prefill {prefill / one['prefill_s']:7.1f} tok/s, rss {one['peak_rss_mib']:.0f} MiB, "
                      f"load {one['load_avg']:.1f}",
                      flush=True)
    rows = []
    for (eng, dt) in [k for k in res if k[0] != "llama.cpp"]:
        L, Q = res[("llama.cpp", dt)], res[(eng, dt)]
        same = all(x["tokens"] == L[0]["tokens"] for x in L) and all(x["tokens"] == Q[0]["tokens"] for x in Q)
        for what, key, n in (("decode", "decode_s", new_tokens), ("steps", "steps_s", new_tokens - 1),
                             ("prefill", "prefill_s", prefill)):
            lt = [n / x[key] for x in L]
            qt = [n / x[key] for x in Q]
            rows.append(dict(checkpoint=ckpt.name, dtype=dt, q3lab=eng, kernels=Q[0].get("kernels", ""),
                             what={"decode": f"decode {n} tok", "steps": f"decode steps ({n})",
                                   "prefill": f"prefill T={n}"}[what],
                             llama_cpp_tok_s=statistics.median(lt), q3lab_tok_s=statistics.median(qt),
                             ratio=statistics.median(qt) / statistics.median(lt),
                             llama_range=f"{min(lt):.0f}-{max(lt):.0f}", q3lab_range=f"{min(qt):.0f}-{max(qt):.0f}",
                             llama_rss_MiB=statistics.median(x["peak_rss_mib"] for x in L),
                             q3lab_rss_MiB=statistics.median(x["peak_rss_mib"] for x in Q),
                             first_divergence=first_divergence(Q[0]["tokens"], L[0]["tokens"])
                             + ("" if same else " (runs differ)")))
    return rows, notes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", nargs="*", type=Path, default=None,
                    help="checkpoints or stores (default: data/mini, and --synth-medium when given)")
    ap.add_argument("--synth-medium", type=Path, help="also bench `q3lab synth --preset medium` here "
                                                      "(written if absent; 1.7 GB: keep it out of the repo)")
    ap.add_argument("--dtypes", default="f32,bf16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per process; the fastest counts")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--work", type=Path, default=Path("/tmp/q3lab-cpu-peer"), help="where the GGUF files go")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md")
    # the worker (internal)
    ap.add_argument("--torch-baseline", dest="kernels", action="store_true",
                    help="also time q3lab on its torch kernel set (Q3LAB_CPU_KERNELS=0), as before the C kernels")
    ap.add_argument("--worker", choices=["llama.cpp", "q3lab", "q3lab-torch"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        spec = json.loads(a.spec)
        a.engine, a.prompt, a.long = a.worker, spec["prompt"], spec["long"]
        worker(a)
        return
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("bench/cpu_peer.py needs llama-cpp-python: pip install llama-cpp-python==0.3.36 "
                         "(builds llama.cpp from source)") from None
    import pandas as pd

    import q3lab
    paths = list(a.checkpoint) if a.checkpoint else [ROOT / "data" / "mini"]
    if a.synth_medium is not None:
        if not (a.synth_medium / "config.json").exists():
            q3lab.synth(a.synth_medium, "medium", seed=0)
        paths.append(a.synth_medium)
    a.work.mkdir(parents=True, exist_ok=True)
    from q3lab.kernels import cpu as cpu_kernels   # build once here, not inside a timed worker (KernelError: say why, stop)
    cpu_kernels.lib()
    print(f"q3lab's CPU kernel set: q3lab.kernels.cpu, {cpu_kernels.isa()}", flush=True)
    dtypes = [d.strip() for d in a.dtypes.split(",") if d.strip()]
    load0, t0 = os.getloadavg(), time.perf_counter()
    rows, notes = [], []
    for p in paths:
        r, n = bench(p, dtypes, a.rounds, a.threads, a.new_tokens, a.prefill, a.work, a.kernels, a.repeats)
        rows += r
        notes += n
    load1 = os.getloadavg()
    text = pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.2f}")
    print(text)
    cmd = " ".join([".venv/bin/python bench/cpu_peer.py", *(f"--checkpoint {p}" for p in a.checkpoint or []),
                    *([f"--synth-medium {a.synth_medium}"] if a.synth_medium else []),
                    f"--dtypes {a.dtypes} --rounds {a.rounds} --repeats {a.repeats} --threads {a.threads} "
                    f"--new-tokens {a.new_tokens}",
                    f"--prefill {a.prefill}", *(["--torch-baseline"] if a.kernels else [])])
    import torch
    from q3lab.runtime.step import CPU_F32_DECODE_MIN_HIDDEN, CPU_F32_MIN_HIDDEN
    sysinfo = llama_cpp.llama_print_system_info().decode().strip()
    header = (f"\n## CPU: q3lab vs llama.cpp on the same weights ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)\n\n"
              f"{platform.platform()}; {platform.processor() or platform.machine()}; {os.cpu_count()} cores; "
              f"{a.threads} threads each; torch {torch.__version__}; llama-cpp-python {llama_cpp.__version__} "
              f"(llama.cpp built from source: {sysinfo}). Load average (1/5/15 min) {load0[0]:.1f}/{load0[1]:.1f}/"
              f"{load0[2]:.1f} at the start, {load1[0]:.1f}/{load1[1]:.1f}/{load1[2]:.1f} at the end. "
              f"Took {time.perf_counter() - t0:.0f} s.\n\n    {cmd}\n\n"
              f"Batch 1, greedy. Medians of {a.rounds} interleaved rounds, each engine and dtype in a fresh process "
              f"that times {a.repeats} runs and keeps its fastest; "
              f"ratio = q3lab tok/s / llama.cpp tok/s in this run; ranges = slowest-fastest round (tok/s); "
              f"rss = peak resident set of the process (load included; llama.cpp maps the GGUF); "
              f"decode = {a.new_tokens} tokens after a {PROMPT_LEN}-token prompt, its forward included; decode steps = "
              f"the one-token steps only (from the first new token to the last); "
              f"first_divergence = first greedy step where q3lab's token differs from llama.cpp's. "
              f"KV cache in the dtype of the weights for both. q3lab = `Thinker.generate` on its CPU kernel set "
              f"(step.CPU: q3lab.kernels.cpu, {cpu_kernels.isa()}); q3lab-torch = the same with "
              f"Q3LAB_CPU_KERNELS=0 (torch's kernels, as before); kernels = the kernel set q3lab's step ran "
              f"(`step.kernels_for`: cpu for bf16 and float32 from hidden {CPU_F32_MIN_HIDDEN}, and for the decode steps of "
              f"float32 from hidden {CPU_F32_DECODE_MIN_HIDDEN}, else torch).\n\n")
    with open(a.results, "a") as f:
        f.write(header + "```\n" + text + "\n```\n\n" + "".join(f"- {n}\n" for n in notes))
    print("\n".join(notes))
    print(f"appended to {a.results}")


if __name__ == "__main__":
    main()
