"""The full-size thinker on a small CPU machine: q3lab's expert cache vs transformers' own disk offloading.

    flock /tmp/q3lab-cpu.lock .venv/bin/python bench/full_cpu.py --checkpoint /work/big/full \
        [--cache 7.5GB] [--prompt-tokens 32] [--new-tokens 16] [--reference-layers 3] [--no-reference]

What runs, each system in its own process (so that each peak resident memory, VmHWM, is its own):
1. The disk's sequential read speed: one shard, its pages dropped from the page cache first (fadvise).
2. q3lab on the checkpoint (all layers), bf16, an ExpertCache of --cache bytes, starting from a cold page
   cache: prefill tokens/s, decode tokens/s (median per-token time), hit rate, bytes read per token, VmHWM.
3. Unless --no-reference: transformers' `Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(...,
   device_map="auto", max_memory=..., offload_folder=...)`. Offloading per-expert weights makes accelerate
   write every offloaded layer again, fused, into the offload folder (transformers fuses experts into
   gate_up_proj when loading): about 54 GB for the full model, more than the disk holds. So the comparison
   runs on a synthetic checkpoint with --reference-layers layers at the full width, written here and deleted
   afterwards, for both q3lab (cache scaled by layers) and transformers, with the greedy tokens compared.
   transformers' 48-layer decode time is then extrapolated from its measured per-layer times (decoder layers
   resident and offloaded, timed with forward hooks) on the device map that the same call would give the full
   model under --reference-memory (computed on a meta model). Offloaded layers are timed with their offload
   files dropped from the page cache before each token, since 40-odd GB of them cannot stay cached.
Prints a table and appends it, with machine, date and command, to --results.
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
GB = 1e9


# -- measurement helpers -------------------------------------------------------------------------------
def proc_status() -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile of this process in bytes (from /proc/self/status)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def proc_read_bytes() -> int:
    """Bytes this process caused to be fetched from the block device (page-cache hits excluded)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def evict(paths) -> None:
    """Drop these files' pages from the page cache (only theirs: the machine is shared)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".dat"))


def disk_read_speed(path: Path, limit: int = 4 * 2**30, block: int = 64 * 2**20) -> dict:
    """Sequential read of up to `limit` bytes of `path` after dropping its pages: bytes/s from the device."""
    evict([path])
    buf = bytearray(block)
    view = memoryview(buf)
    got, t0 = 0, time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while got < limit:
            n = f.readinto(view[:min(block, limit - got)])
            if not n:
                break
            got += n
    dt = time.perf_counter() - t0
    evict([path])
    return {"file": path.name, "bytes": got, "seconds": dt, "bytes_per_s": got / dt}


def prompt_ids(n: int, seed: int, vocab: int):
    import torch
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, min(vocab, 4000), (1, n), generator=g)


def forced_ids(n: int, seed: int, vocab: int):
    """The tokens fed one at a time in the forced decode: greedy decoding of random weights repeats one token
    (so routing, and the cache, see the same experts every step); fresh random tokens vary the routing."""
    return prompt_ids(n, seed + 1, vocab)[0]


class _Stop(Exception):
    pass


# -- workers (each in its own process) -------------------------------------------------------------------
def worker_q3lab(a) -> dict:
    """Load with an ExpertCache, prefill, greedy-decode; the cache's counters split into prefill and decode."""
    import torch
    import q3lab
    torch.set_num_threads(a.threads)
    path = Path(a.checkpoint)
    if a.cold:
        evict(weight_files(path))
    base = proc_status()
    io0, t0 = proc_read_bytes(), time.perf_counter()
    cache = q3lab.ExpertCache(a.cache)
    model = q3lab.load(path, dtype=torch.bfloat16, experts=cache)
    load_s, after_load = time.perf_counter() - t0, proc_status()
    io_load = proc_read_bytes() - io0
    ids = prompt_ids(a.prompt_tokens, a.seed, model.config.vocab_size)
    logits: list = []
    model.lm_head.register_forward_hook(
        lambda m, i, o: logits.append(o[0, -1].float().clone()) if len(logits) < a.keep_logits else None)
    marks, tokens, phase = [], [], {}

    def streamer(tok):
        marks.append(time.perf_counter())
        tokens.append(int(tok[0]))
        if len(marks) == 1:   # prefill done: keep its counters, count decode alone from here
            phase["prefill"] = cache.summary()
            phase["io_prefill"] = proc_read_bytes()
            cache.reset_stats()
        if marks[-1] - start > a.max_seconds:
            raise _Stop

    io1 = proc_read_bytes()
    start = time.perf_counter()
    try:
        model.generate(ids, a.new_tokens, streamer=streamer)
    except _Stop:
        pass
    end_io = proc_read_bytes()
    dec = cache.summary()
    steps = [b - a_ for a_, b in zip(marks, marks[1:])]
    n_dec = len(steps)
    # Forced decode: the same prompt, then random tokens one at a time (varied routing); cold for the experts
    # the cache does not hold, as far as the page cache allows.
    forced = forced_ids(a.forced_tokens, a.seed, model.config.vocab_size)
    flog: list = []
    with torch.inference_mode():
        kv = model.new_cache(1, a.prompt_tokens + len(forced))
        model(ids, cache=kv, last_only=True)
        cache.reset_stats()
        fio0, fsteps = proc_read_bytes(), []
        for tok in forced:
            t = time.perf_counter()
            out = model(tok.view(1, 1), cache=kv, last_only=True)
            fsteps.append(time.perf_counter() - t)
            flog.append(out[0, -1].float().clone()) if len(flog) < a.keep_logits else None
            if sum(fsteps) > a.max_seconds:
                break
    fsum, fio = cache.summary(), proc_read_bytes() - fio0
    nf = len(fsteps)
    uni = uniform_decode(model, cache, ids, forced[:a.uniform_tokens], a) if a.uniform_tokens else None
    if a.logits_out:
        torch.save({"greedy": torch.stack(logits[:a.keep_logits]), "forced": torch.stack(flog)}, a.logits_out)
    st = proc_status()
    cfg = model.config
    return {
        "uniform": uni, "forced_steps": fsteps, "forced_tok_s": 1 / statistics.median(fsteps), "forced_hit_rate": fsum["hit_rate"],
        "forced_bytes_per_tok": fsum["bytes_loaded"] / nf, "forced_disk_bytes_per_tok": fio / nf,
        "forced_misses_per_tok": fsum["misses"] / nf, "forced_load_seconds_per_tok": fsum["load_seconds"] / nf,
        "system": "q3lab", "layers": cfg.num_hidden_layers, "load_s": load_s, "load_disk_bytes": io_load,
        "prefill_s": marks[0] - start, "prefill_tok_s": a.prompt_tokens / (marks[0] - start),
        "decode_steps": steps, "decode_tok_s": 1 / statistics.median(steps) if steps else float("nan"),
        "tokens": tokens, "cache_experts": cache.capacity, "cache_bytes": cache.capacity * cache.expert_bytes,
        "expert_bytes": cache.expert_bytes, "total_experts": cfg.num_hidden_layers * cfg.num_experts,
        "prefill_hit_rate": phase["prefill"]["hit_rate"], "prefill_bytes": phase["prefill"]["bytes_loaded"],
        "hit_rate": dec["hit_rate"], "misses_per_tok": dec["misses"] / max(n_dec, 1),
        "bytes_per_tok": dec["bytes_loaded"] / max(n_dec, 1), "load_seconds_per_tok": dec["load_seconds"] / max(n_dec, 1),
        "disk_bytes_per_tok": (end_io - phase["io_prefill"]) / max(n_dec, 1),
        "prefill_disk_bytes": phase["io_prefill"] - io1,
        "vmhwm": st["VmHWM"], "rss_anon": st["RssAnon"], "rss_after_load": after_load["VmRSS"],
        "rss_base": base["VmRSS"],
    }


def uniform_decode(model, cache, ids, forced, a) -> dict:
    """Forced decode with each layer's router choice replaced by 8 experts drawn uniformly (a forward pre-hook
    on every `mlp.experts`): the outputs mean nothing, the cost is that of routing with no locality at all, the
    worst case for any cache. Random weights route with far more locality than that (see the hit rates)."""
    import torch
    g = torch.Generator().manual_seed(a.seed + 2)
    E, k = model.config.num_experts, model.config.num_experts_per_tok

    def draw(mod, args):
        h, idx, w = args
        rnd = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(idx.shape[0])]).to(idx)
        return h, rnd, w

    with torch.inference_mode():
        kv = model.new_cache(1, ids.shape[1] + len(forced))
        model(ids, cache=kv, last_only=True)
        hooks = [layer.mlp.experts.register_forward_pre_hook(draw) for layer in model.model.layers]
        cache.reset_stats()
        io0, steps = proc_read_bytes(), []
        try:
            for tok in forced:
                t = time.perf_counter()
                model(tok.view(1, 1), cache=kv, last_only=True)
                steps.append(time.perf_counter() - t)
        finally:
            for hk in hooks:
                hk.remove()
    s, n = cache.summary(), len(steps)
    return {"steps": steps, "tok_s": 1 / statistics.median(steps), "hit_rate": s["hit_rate"],
            "bytes_per_tok": s["bytes_loaded"] / n, "disk_bytes_per_tok": (proc_read_bytes() - io0) / n,
            "misses_per_tok": s["misses"] / n, "load_seconds_per_tok": s["load_seconds"] / n}


def worker_reference(a) -> dict:
    """transformers' thinker with accelerate's disk offload; per-layer forward times; greedy tokens."""
    import torch
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration as Thinker
    torch.set_num_threads(a.threads)
    path, off = Path(a.checkpoint), Path(a.offload_folder)
    evict(weight_files(path))
    mem = int(a.max_memory) if a.max_memory.isdigit() else a.max_memory
    t0 = time.perf_counter()
    model = Thinker.from_pretrained(path, dtype=torch.bfloat16, device_map="auto",
                                    max_memory={"cpu": mem}, offload_folder=str(off))
    load_s, after_load = time.perf_counter() - t0, proc_status()
    dmap = dict(model.hf_device_map)
    layers = model.model.language_model.layers
    where = [placement(dmap, f"model.language_model.layers.{i}") for i in range(len(layers))]
    lm_where = placement(dmap, "lm_head")
    ids = prompt_ids(a.prompt_tokens, a.seed, model.config.text_config.vocab_size)
    times: list[list[float]] = []   # per forward call: seconds per decoder layer
    begun = {}

    def pre(i):
        def f(mod, args, kwargs=None):
            if i == 0:
                times.append([0.0] * len(layers))
            begun[i] = time.perf_counter()
        return f

    def post(i):
        def f(mod, args, out):
            times[-1][i] = time.perf_counter() - begun[i]
        return f

    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(pre(i))
        layer.register_forward_hook(post(i))
    disk_files = weight_files(off)

    class Streamer:
        def __init__(self, cold: bool):
            self.cold, self.marks, self.tokens = cold, [], []

        def put(self, value):
            self.marks.append(time.perf_counter())
            if len(self.marks) > 1:
                self.tokens.append(int(value.reshape(-1)[0]))
            if self.cold:   # the next forward reads every offloaded layer from the device again
                evict(disk_files)

        def end(self):
            pass

    runs = {}
    for label, cold in (("warm", False), ("cold", True)):
        if cold:
            evict(disk_files)
        s = Streamer(cold)
        times.clear()
        io0, start = proc_read_bytes(), time.perf_counter()
        out = model.generate(input_ids=ids, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                             do_sample=False, streamer=s, max_time=a.max_seconds, output_scores=True,
                             return_dict_in_generate=True)
        io = proc_read_bytes() - io0
        marks = s.marks[1:]            # the first put() is the prompt itself
        steps = [b - a_ for a_, b in zip(marks, marks[1:])]
        dec_layers = times[1:len(steps) + 1]
        res = [t[i] for t in dec_layers for i in range(len(layers)) if where[i] == "cpu"]
        dsk = [t[i] for t in dec_layers for i in range(len(layers)) if where[i] == "disk"]
        other = [st - sum(t) for st, t in zip(steps, dec_layers)]
        runs[label] = {
            "prefill_s": marks[0] - start, "prefill_tok_s": a.prompt_tokens / (marks[0] - start),
            "decode_steps": steps, "decode_tok_s": 1 / statistics.median(steps) if steps else float("nan"),
            "tokens": s.tokens, "disk_bytes": io,
            "layer_resident_s": statistics.median(res) if res else None,
            "layer_disk_s": statistics.median(dsk) if dsk else None,
            "other_s": statistics.median(other) if other else None,
        }
        if label == "warm":
            greedy_logits = torch.stack([sc[0].float() for sc in out.scores[:a.keep_logits]])
    # Forced decode, cold: the same prompt, then random tokens one at a time with the offload files dropped
    # from the page cache before each step (what 40-odd GB of offloaded layers amount to on the full model).
    forced = forced_ids(a.forced_tokens, a.seed, model.config.text_config.vocab_size)
    flog, fsteps = [], []
    with torch.no_grad():
        times.clear()
        o = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        pkv = o.past_key_values
        io0 = proc_read_bytes()
        for tok in forced:
            evict(disk_files)
            t = time.perf_counter()
            o = model(input_ids=tok.view(1, 1), cache=pkv, use_cache=True, logits_to_keep=1)
            fsteps.append(time.perf_counter() - t)
            pkv = o.past_key_values
            flog.append(o.logits[0, -1].float().clone()) if len(flog) < a.keep_logits else None
            if sum(fsteps) > a.max_seconds:
                break
        io = proc_read_bytes() - io0
    dec_layers = times[1:len(fsteps) + 1]
    res = [t[i] for t in dec_layers for i in range(len(layers)) if where[i] == "cpu"]
    dsk = [t[i] for t in dec_layers for i in range(len(layers)) if where[i] == "disk"]
    runs["forced"] = {"decode_steps": fsteps, "decode_tok_s": 1 / statistics.median(fsteps), "disk_bytes_per_tok":
                      io / len(fsteps), "layer_resident_s": statistics.median(res) if res else None,
                      "layer_disk_s": statistics.median(dsk) if dsk else None,
                      "other_s": statistics.median([st - sum(t) for st, t in zip(fsteps, dec_layers)])}
    if a.logits_out:
        torch.save({"greedy": greedy_logits, "forced": torch.stack(flog)}, a.logits_out)
    st = proc_status()
    return {"system": "transformers", "layers": len(layers), "load_s": load_s, "max_memory": a.max_memory,
            "placement": where, "lm_head": lm_where, "offload_bytes": sum(p.stat().st_size for p in disk_files),
            "runs": runs, "vmhwm": st["VmHWM"], "rss_anon": st["RssAnon"], "rss_after_load": after_load["VmRSS"]}


def placement(dmap: dict, name: str) -> str:
    """Where accelerate put a module: the device of its own entry or of the nearest enclosing one."""
    parts = name.split(".")
    for k in range(len(parts), -1, -1):
        key = ".".join(parts[:k])
        if key in dmap:
            return str(dmap[key])
    return "?"


def worker_device_map(a) -> dict:
    """The device map from_pretrained(device_map="auto", max_memory=...) gives the full model, on a meta model."""
    import torch
    from accelerate import init_empty_weights
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration as Thinker
    from transformers.integrations.accelerate import _get_device_map
    cfg = Thinker.config_class.from_pretrained(a.checkpoint)
    with init_empty_weights():
        model = Thinker._from_config(cfg, dtype=torch.bfloat16)
    dmap = _get_device_map(model, "auto", {"cpu": a.max_memory}, None)
    n = cfg.text_config.num_hidden_layers
    where = [placement(dmap, f"model.language_model.layers.{i}") for i in range(n)]
    return {"layers": n, "placement": where, "lm_head": placement(dmap, "lm_head"), "max_memory": a.max_memory}


def run_worker(kind: str, args, **extra) -> dict:
    """Run a worker in a fresh process (its own VmHWM); returns its JSON result."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    cmd = [sys.executable, __file__, "--worker", kind, "--worker-out", str(out), "--threads", str(args.threads),
           "--prompt-tokens", str(args.prompt_tokens), "--forced-tokens", str(args.forced_tokens),
           "--uniform-tokens", str(args.uniform_tokens), "--seed", str(args.seed), "--max-seconds", str(args.max_seconds)]
    for k, v in extra.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)] if not isinstance(v, bool) else ([f"--{k.replace('_', '-')}"] if v else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    print(f"[full_cpu] {kind}: {' '.join(cmd[2:])}", flush=True)
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"full_cpu: the {kind} worker failed with exit status {proc.returncode} (see above)")
    res = json.loads(out.read_text())
    out.unlink()
    return res


# -- the benchmark -------------------------------------------------------------------------------------
def sec(v) -> str:
    return "not measured" if v is None else f"{v:.2f} s"


def fmt_gb(b) -> str:
    return f"{b / GB:.2f}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=Path("/work/big/full"),
                    help="a full-size Qwen3-Omni checkpoint folder (q3lab synth --preset full)")
    ap.add_argument("--cache", default="7.5GB", help="q3lab expert cache size for the full checkpoint")
    ap.add_argument("--new-tokens", type=int, default=16, help="q3lab greedy tokens")
    ap.add_argument("--ref-new-tokens", type=int, default=4, help="transformers greedy tokens (slow: keep small)")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--forced-tokens", type=int, default=16, help="decode steps fed random tokens (varied routing)")
    ap.add_argument("--uniform-tokens", type=int, default=8, help="q3lab decode steps with uniformly drawn experts "
                    "(no routing locality: a cache's worst case); 0 to skip")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-seconds", type=float, default=300.0, help="wall-clock cap per generation")
    ap.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                    help="also run transformers (on a --reference-layers synthetic at full width)")
    ap.add_argument("--reference-layers", type=int, default=3)
    ap.add_argument("--reference-preset", default="full", help="synth preset of the small checkpoint "
                    "(tiny: a quick trial of the script)")
    ap.add_argument("--reference-memory", default="10GB",
                    help="max_memory['cpu'] that transformers' full model would get (device map extrapolation)")
    ap.add_argument("--work", type=Path, default=None, help="where the small synthetic and the offload folder go "
                    "(default: next to --checkpoint); deleted afterwards")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md")
    ap.add_argument("--limit-gb", type=float, default=12.0, help="the peak resident memory goal for q3lab")
    # internal: a worker process
    ap.add_argument("--worker", choices=["q3lab", "reference", "device-map"], help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    ap.add_argument("--cold", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--offload-folder", help=argparse.SUPPRESS)
    ap.add_argument("--max-memory", help=argparse.SUPPRESS)
    ap.add_argument("--logits-out", help=argparse.SUPPRESS)
    ap.add_argument("--keep-logits", type=int, default=4, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        if a.worker == "q3lab":
            a.cache = int(a.cache) if str(a.cache).isdigit() else a.cache
        fn = {"q3lab": worker_q3lab, "reference": worker_reference, "device-map": worker_device_map}[a.worker]
        Path(a.worker_out).write_text(json.dumps(fn(a)))
        return
    if not (a.checkpoint / "config.json").is_file():
        ap.error(f"--checkpoint {a.checkpoint}: expected a checkpoint folder with config.json, found "
                 f"{'no such folder' if not a.checkpoint.exists() else 'no config.json in it'}")
    if a.reference and a.reference_layers < 2:
        ap.error("--reference-layers must be at least 2 (one resident and one offloaded layer are timed)")
    for n in ("new_tokens", "ref_new_tokens", "prompt_tokens"):
        if getattr(a, n) < 1 or (n != "prompt_tokens" and getattr(a, n) < 2):
            ap.error(f"--{n.replace('_', '-')} must be at least 2 (one prefill token and one decode step)")
    t_start = time.perf_counter()
    from q3lab.weights.checkpoint import Checkpoint
    ckpt = Checkpoint.open(a.checkpoint)   # CheckpointError (a Q3LabError) on a folder that is not one
    cfg = ckpt.config
    L = cfg.num_hidden_layers
    shard = max((a.checkpoint / s for s in ckpt.shards), key=lambda p: p.stat().st_size)

    print(f"[full_cpu] disk: sequential read of {shard.name} after dropping its pages", flush=True)
    disk = disk_read_speed(shard)
    print(f"[full_cpu] disk: {disk['bytes'] / 2**30:.2f} GiB in {disk['seconds']:.1f} s = "
          f"{disk['bytes_per_s'] / GB:.2f} GB/s", flush=True)

    full = run_worker("q3lab", a, checkpoint=a.checkpoint, cache=a.cache, new_tokens=a.new_tokens, cold=True)
    print(f"[full_cpu] q3lab {L} layers: decode {full['decode_tok_s']:.3f} tok/s, hit rate {full['hit_rate']:.3f}, "
          f"VmHWM {fmt_gb(full['vmhwm'])} GB", flush=True)

    small = ref = small_q = dmap48 = None
    if a.reference:
        from q3lab.runtime.experts import parse_bytes
        work = a.work or a.checkpoint.parent
        small = work / f"full{a.reference_layers}-bench"
        off = work / f"offload{a.reference_layers}-bench"
        try:
            import q3lab
            print(f"[full_cpu] writing {small}: synth preset {a.reference_preset}, {a.reference_layers} layers", flush=True)
            q3lab.synth(small, a.reference_preset, seed=a.seed, layers=a.reference_layers, progress=False)
            k = a.reference_layers
            cache_k = max(parse_bytes(a.cache) * k // L, 1)
            small_q = run_worker("q3lab", a, checkpoint=small, cache=f"{cache_k}B", new_tokens=a.ref_new_tokens,
                                 logits_out=work / "q3lab-logits.pt")
            # The same memory budget per layer as --reference-memory gives the full model, but at least the
            # embeddings and one decoder layer, so that both resident and offloaded layers get timed.
            dmap48 = run_worker("device-map", a, checkpoint=a.checkpoint, max_memory=a.reference_memory)
            sc = Checkpoint.open(small).config
            layer_b = 2 * (sc.num_experts * sc.expert_numel + 2 * sc.hidden_size * sc.head_dim
                           * (sc.num_attention_heads + sc.num_key_value_heads))   # bf16 bytes of one layer
            # embeddings + one resident layer + room accelerate keeps for loading one offloaded layer
            budget = 2 * sc.vocab_size * sc.hidden_size + 2.5 * layer_b
            ref = run_worker("reference", a, checkpoint=small, offload_folder=off, max_memory=f"{int(budget)}",
                             new_tokens=a.ref_new_tokens, logits_out=work / "ref-logits.pt")
            import torch
            lq, lr = torch.load(work / "q3lab-logits.pt"), torch.load(work / "ref-logits.pt")
            for key in ("greedy", "forced"):
                n = min(len(lq[key]), len(lr[key]))
                ref[f"logit_maxdiff_{key}"] = [float((lq[key][i] - lr[key][i]).abs().max()) for i in range(n)]
                ref[f"argmax_equal_{key}"] = bool((lq[key][:n].argmax(-1) == lr[key][:n].argmax(-1)).all())
        finally:
            for p in (small, off):
                shutil.rmtree(p, ignore_errors=True)
            for p in (work / "q3lab-logits.pt", work / "ref-logits.pt"):
                p.unlink(missing_ok=True)
    report(a, cfg, disk, full, small_q, ref, dmap48, time.perf_counter() - t_start)


def report(a, cfg, disk, full, small_q, ref, dmap48, elapsed: float) -> None:
    import pandas as pd
    import torch
    L, dspeed = cfg.num_hidden_layers, disk["bytes_per_s"]
    nan = float("nan")

    def q_rows(r):
        label = f"q3lab, cache {fmt_gb(r['cache_bytes'])} GB"
        return [{"system": label, "layers": r["layers"], "decode": "greedy", "source": "measured",
                 "prefill_tok_s": r["prefill_tok_s"], "decode_tok_s": r["decode_tok_s"], "peak_rss_gb": r["vmhwm"] / GB,
                 "hit_rate": r["hit_rate"], "loaded_gb_tok": r["bytes_per_tok"] / GB,
                 "disk_gb_tok": r["disk_bytes_per_tok"] / GB},
                {"system": label, "layers": r["layers"], "decode": "forced", "source": "measured",
                 "prefill_tok_s": nan, "decode_tok_s": r["forced_tok_s"], "peak_rss_gb": r["vmhwm"] / GB,
                 "hit_rate": r["forced_hit_rate"], "loaded_gb_tok": r["forced_bytes_per_tok"] / GB,
                 "disk_gb_tok": r["forced_disk_bytes_per_tok"] / GB}] + ([
                {"system": label, "layers": r["layers"], "decode": "uniform", "source": "measured",
                 "prefill_tok_s": nan, "decode_tok_s": r["uniform"]["tok_s"], "peak_rss_gb": r["vmhwm"] / GB,
                 "hit_rate": r["uniform"]["hit_rate"], "loaded_gb_tok": r["uniform"]["bytes_per_tok"] / GB,
                 "disk_gb_tok": r["uniform"]["disk_bytes_per_tok"] / GB}] if r.get("uniform") else [])

    rows = q_rows(full)
    ref48 = None
    if ref is not None:
        k = ref["layers"]
        rows += q_rows(small_q)
        label = f"transformers, offload, max_memory {int(ref['max_memory']) / GB:.2f} GB"
        for run, decode in (("warm", "greedy, warm"), ("cold", "greedy"), ("forced", "forced")):
            r = ref["runs"][run]
            n_fw = len(r["decode_steps"]) + (1 if run != "forced" else 0)
            rows.append({"system": label, "layers": k, "decode": decode, "source": "measured",
                         "prefill_tok_s": r.get("prefill_tok_s", nan), "decode_tok_s": r["decode_tok_s"],
                         "peak_rss_gb": ref["vmhwm"] / GB, "hit_rate": nan, "loaded_gb_tok": nan,
                         "disk_gb_tok": (r["disk_bytes_per_tok"] if run == "forced" else r["disk_bytes"] / n_fw) / GB})
        f = ref["runs"]["forced"]
        n_res, n_disk = dmap48["placement"].count("cpu"), dmap48["placement"].count("disk")
        # a kind of layer the small run did not have is timed as the other kind (said below)
        t_res = f["layer_resident_s"] if f["layer_resident_s"] is not None else f["layer_disk_s"]
        t_dsk = f["layer_disk_s"] if f["layer_disk_s"] is not None else f["layer_resident_s"]
        t48 = f["other_s"] + n_res * t_res + n_disk * t_dsk
        ref48 = {"n_res": n_res, "n_disk": n_disk, "lm_head": dmap48["lm_head"], "t": t48}
        rows.append({"system": f"transformers, offload, max_memory {a.reference_memory}", "layers": L,
                     "decode": "forced", "source": "extrapolated", "prefill_tok_s": nan, "decode_tok_s": 1 / t48,
                     "peak_rss_gb": nan, "hit_rate": nan, "loaded_gb_tok": nan, "disk_gb_tok": nan})
    df = pd.DataFrame(rows)
    if ref is not None:
        # baseline: transformers with the same layer count and decode (cold page cache for its offloaded layers)
        base = {(k, "greedy"): ref["runs"]["cold"]["decode_tok_s"], (k, "forced"): ref["runs"]["forced"]["decode_tok_s"],
                (L, "greedy"): 1 / ref48["t"], (L, "forced"): 1 / ref48["t"], (L, "uniform"): 1 / ref48["t"],
                (k, "uniform"): ref["runs"]["forced"]["decode_tok_s"]}
        df["x_transformers"] = [r.decode_tok_s / base.get((r.layers, r.decode.split(",")[0]), nan)
                                for r in df.itertuples()]
    text = df.to_string(index=False, float_format=lambda v: f"{v:.3g}")
    print("\n" + text)
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "flock /tmp/q3lab-cpu.lock .venv/bin/python " + " ".join(["bench/full_cpu.py", *sys.argv[1:]])
    ram = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30)
    fl = full
    lines = [
        f"\n## Full-size thinker on the CPU (`bench/full_cpu.py`, {now})\n",
        f"{platform.platform()}; {os.cpu_count()} CPUs; {ram} GiB RAM; torch {torch.__version__}, {a.threads} threads; "
        f"the benchmark took {elapsed:.0f} s.\n",
        f"Command:\n\n    {cmd}\n",
        f"Checkpoint `{a.checkpoint}`: {L} layers x {cfg.num_experts} experts (top-{cfg.num_experts_per_tok}), hidden "
        f"{cfg.hidden_size}, bf16, random weights (q3lab synth, seed {a.seed}). Prompt: {a.prompt_tokens} random tokens. "
        f"decode `greedy`: greedy generation ({a.new_tokens} new tokens for q3lab on {L} layers, {a.ref_new_tokens} on "
        f"the small checkpoint); random weights make greedy decoding repeat one token, so routing repeats and the "
        f"cache hits almost always. decode `forced`: after the same prompt, {a.forced_tokens} random tokens fed one at a "
        f"time (routing varies as with real text): the realistic cache workload. decode_tok_s = 1 / median step time. "
        f"peak_rss_gb = VmHWM of the process (each system in its own process). loaded_gb_tok = expert bytes the "
        f"cache loaded per decode step; disk_gb_tok = bytes fetched from the block device per step "
        f"(/proc/self/io read_bytes; the rest of a load came from the page cache).\n",
        f"Disk: sequential read of {disk['file']} after dropping its pages: {disk['bytes'] / 2**30:.2f} GiB at "
        f"{dspeed / GB:.2f} GB/s.\n",
        "```\n" + text + "\n```\n",
        f"q3lab, {L} layers (measured, started with the checkpoint's pages dropped from the page cache): load "
        f"{fl['load_s']:.0f} s ({fmt_gb(fl['load_disk_bytes'])} GB from disk), RSS after load "
        f"{fmt_gb(fl['rss_after_load'])} GB; cache {fl['cache_experts']} of {fl['total_experts']} experts "
        f"({fl['cache_experts'] / fl['total_experts']:.1%}); prefill of {a.prompt_tokens} tokens "
        f"{fl['prefill_s']:.1f} s ({fmt_gb(fl['prefill_bytes'])} GB of experts loaded, "
        f"{fmt_gb(fl['prefill_disk_bytes'])} GB from disk). Forced decode: {fl['forced_misses_per_tok']:.0f} misses "
        f"per step, {fl['forced_bytes_per_tok'] / GB:.2f} GB loaded ({fl['forced_load_seconds_per_tok']:.2f} s of "
        f"the {statistics.median(fl['forced_steps']):.2f} s median step), {fl['forced_disk_bytes_per_tok'] / GB:.2f} "
        f"GB from disk: floor at the measured disk speed {fl['forced_disk_bytes_per_tok'] / dspeed:.2f} s per step "
        f"({fl['forced_bytes_per_tok'] / dspeed:.2f} s had every load come from the disk). Greedy decode median step "
        f"{statistics.median(fl['decode_steps']):.2f} s with {fl['misses_per_tok']:.0f} misses: the compute floor of "
        f"this machine (dense weights and 8 experts per layer read from memory)."
        + (f" Uniform routing (each layer's 8 experts drawn at random; outputs meaningless, the cost of routing "
           f"without locality): {fl['uniform']['misses_per_tok']:.0f} misses per step, "
           f"{fl['uniform']['bytes_per_tok'] / GB:.2f} GB loaded, {fl['uniform']['disk_bytes_per_tok'] / GB:.2f} GB "
           f"from disk, median step {statistics.median(fl['uniform']['steps']):.2f} s (disk floor "
           f"{fl['uniform']['disk_bytes_per_tok'] / dspeed:.2f} s)." if fl.get("uniform") else "")
        + f" Peak {fmt_gb(fl['vmhwm'])} GB, "
        f"{'under' if fl['vmhwm'] < a.limit_gb * GB else 'OVER'} the {a.limit_gb:g} GB goal.\n",
    ]
    if ref is not None:
        k, w, c, f = ref["layers"], ref["runs"]["warm"], ref["runs"]["cold"], ref["runs"]["forced"]
        equal = small_q["tokens"][:len(w["tokens"])] == w["tokens"]
        lines.append(
            f"transformers on a {k}-layer synthetic at full width (measured; written for this run, deleted after): "
            f"`Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16, "
            f"device_map=\"auto\", max_memory={{\"cpu\": {int(ref['max_memory']) / GB:.2f} GB}}, offload_folder=...)` "
            f"(the embeddings and about one layer: the full model's budget per layer) put its decoder layers on "
            f"{ref['placement']} and lm_head on {ref['lm_head']}; load {ref['load_s']:.0f} s, "
            f"{fmt_gb(ref['offload_bytes'])} GB written to the offload folder (fused experts). accelerate maps the "
            f"offloaded weights from that folder, so a step reads only the pages of the experts it uses. Per forced "
            f"step, offload files dropped from the page cache before each: resident decoder layer "
            f"{sec(f['layer_resident_s'])}, offloaded decoder layer {sec(f['layer_disk_s'])}, everything else "
            f"(embeddings, lm_head, generate) {sec(f['other_s'])}; {f['disk_bytes_per_tok'] / GB:.2f} GB from disk per "
            f"step. q3lab on the same folder: a cache of {small_q['cache_experts']} experts (the {L}-layer cache "
            f"scaled by {k}/{L}). Greedy tokens q3lab {small_q['tokens']} vs transformers {w['tokens']} (cold "
            f"{c['tokens']}): {'equal' if equal else 'DIFFERENT'}; forced steps: next-token argmax "
            f"{'equal' if ref['argmax_equal_forced'] else 'DIFFERENT'} at every step; max |logit difference| per "
            f"step (bf16 on both sides) greedy {', '.join(f'{v:.3g}' for v in ref['logit_maxdiff_greedy'])}; forced "
            f"{', '.join(f'{v:.3g}' for v in ref['logit_maxdiff_forced'])}.\n")
        lines.append(
            f"transformers, {L} layers (extrapolated, not run: its offload folder would take about "
            f"{ref48['n_disk'] * cfg.num_experts * cfg.expert_numel * 2 / GB:.0f} GB of fused experts, more than the "
            f"free disk): the same call with max_memory {a.reference_memory} gives {ref48['n_res']} resident and "
            f"{ref48['n_disk']} offloaded decoder layers, lm_head on {ref48['lm_head']} (accelerate's map, computed on a "
            f"meta model); per step = everything else + {ref48['n_res']} x resident + {ref48['n_disk']} x offloaded, from "
            f"the {k}-layer forced steps = {ref48['t']:.2f} s"
            f"{' (no resident layer in the small run: resident layers timed as offloaded ones, which overstates them)' if f['layer_resident_s'] is None else ''}. "
            f"Cold per-layer times assume none of its offloaded pages survive in the page cache from one step to the "
            f"next; with {ref48['n_disk'] * cfg.num_experts * cfg.expert_numel * 2 / GB:.0f} GB offloaded and about "
            f"{ram - 12} GiB of RAM outside a 12 GB process, some would (q3lab's misses found "
            f"{1 - fl['forced_disk_bytes_per_tok'] / max(fl['forced_bytes_per_tok'], 1):.0%} of their bytes there).\n")
    with open(a.results, "a") as fh:
        fh.write("\n".join(lines))
    print(f"\n[full_cpu] appended to {a.results}")


if __name__ == "__main__":
    main()
