"""Train data/mini128, the mini thinker with the real expert topology (48 layers x 128 experts, top-8), and record
router-saturation probes; evaluate a saved one on the CPU through q3lab.load.

    # on a GPU, after scripts/build_corpus.py (the checkpoint, with probes/, in OUT)
    python3 scripts/train_mini128.py train --out OUT --minutes 7
    # on the CPU: the numbers of data/mini128/README.md
    python scripts/train_mini128.py evaluate data/mini128 --json data/mini128/eval.json

Training is scripts/train_mini.py's (`train_mini.train` with the MINI128 config and the probe hooks below):
dense-equivalent experts, AdamW, cosine schedule planned to end at --minutes, and the global-batch
load-balancing loss E * sum_i f_i P_i per layer, f and P over all batch x seq tokens of a step (one GPU, no
gradient accumulation: the step's batch is the global batch), averaged over layers, weight --aux-coef.

Probes: a fixed set of held-out tokens (the last --probe-seq tokens of each domain's validation stream) is routed
at step 0, at --probe-steps, at the --probe-fractions of the planned schedule, and by the final model (bf16
weights, fp32 math); the top-8 ids of every layer go to OUT/probes (layout in q3lab/analysis/saturation.py).

Dimensions: C checkpoints, T probe tokens, L layers, A experts per token, E experts.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_mini as tm  # noqa: E402  (also puts the repository root on sys.path)

from q3lab.errors import InputError  # noqa: E402
from q3lab.analysis.saturation import INDEX_FILE, ROUTING_FILE, TOKENS_FILE  # noqa: E402

# The real thinker's expert topology (48 layers, 128 experts, top-8, norm_topk_prob, no shared expert) with
# data/mini's hidden size, attention and vocabulary. Expert width 8 keeps the active expert width per token
# (8 x 8 = 64) equal to data/mini's (4 x 16). 17,313,888 parameters (experts 14,155,776): 34.6 MB in bf16.
MINI128 = tm.MINI | dict(num_experts=128, num_experts_per_tok=8, moe_intermediate_size=8)

TRAIN_DEFAULTS = dict(shards=3, minutes=7.0, warmup=100, eval_every=250, aux_coef=0.01)


class Prober:
    """Training hooks (`train_mini.train(hooks=...)`): route the probe tokens at chosen steps, write probes/."""

    def __init__(self, args, device):
        val = tm.load_streams(Path(args.corpus), "val")
        seq = args.probe_seq
        rows, self.segments = [], []
        for d in tm.DOMAINS:
            s = val[d]
            if len(s) < seq:
                raise InputError(f"train_mini128: validation stream {d} has {len(s)} tokens, fewer than "
                                 f"--probe-seq {seq}")
            # The end of each stream: disjoint from the first --val-windows windows that eval_loss reads.
            rows.append(torch.from_numpy(s[-seq:]))
            self.segments.append({"domain": d, "start": len(self.segments) * seq, "stop": (len(self.segments) + 1) * seq,
                                  "source": f"val_{d}.npy, its last {seq} tokens"})
        self.ids = torch.stack(rows).to(device)                                     # [4, seq]
        self.fixed = sorted(set(args.probe_steps) | {0})
        self.fractions = args.probe_fractions
        self.planned: set[int] | None = None
        self.batch_tokens = args.batch * args.seq
        self.records: list[np.ndarray] = []
        self.steps: list[int] = []
        self.kinds: list[str] = []

    @torch.no_grad()
    def route(self, model) -> np.ndarray:
        """Top-A ids in rank order of every probe token and layer: uint8 [T, L, A] (fp32 math, no TF32)."""
        got = {}
        hooks = [layer.mlp.hook_topk_ids.register_forward_hook(
            lambda m, i, out, l=l: got.__setitem__(l, out.detach().to("cpu")))
            for l, layer in enumerate(model.model.layers)]
        was_training, tf32 = model.training, torch.backends.cuda.matmul.allow_tf32
        model.eval()
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            model(self.ids)
        finally:
            for h in hooks:
                h.remove()
            torch.backends.cuda.matmul.allow_tf32 = tf32
            model.train(was_training)
        ids = torch.stack([got[l] for l in range(len(model.model.layers))], dim=1)  # [T, L, A]
        return ids.numpy().astype(np.uint8)

    def record(self, step: int, model, kind: str) -> None:
        self.records.append(self.route(model))
        self.steps.append(step)
        self.kinds.append(kind)
        print(f"probe: step {step} ({kind}), checkpoint {len(self.steps) - 1}", flush=True)

    def on_step(self, step: int, total_steps: int | None, model) -> None:
        if total_steps is not None and self.planned is None:
            self.planned = {int(round(f * total_steps)) for f in self.fractions} - {total_steps}
        if step in self.fixed or (self.planned and step in self.planned and step not in self.steps):
            if step not in self.steps:
                self.record(step, model, "training")

    def on_final(self, model, log: dict) -> None:
        self.record(log["steps"], model, "final (shipped bf16 weights)")

    def on_write(self, out: Path, log: dict) -> None:
        folder = out / "probes"
        folder.mkdir(parents=True, exist_ok=True)
        routing = np.stack(self.records)                                            # [C, T, L, A]
        np.save(folder / ROUTING_FILE, routing)
        np.save(folder / TOKENS_FILE, self.ids.reshape(-1).cpu().numpy().astype(np.uint16))
        index = {"format": "q3lab router probes 1: routing.npy uint8 [checkpoint, token, layer, rank], "
                           "rank 0 = top-1; tokens.npy uint16 [token]",
                 "shape": list(routing.shape), "steps": self.steps,
                 "tokens_seen": [s * self.batch_tokens for s in self.steps], "kinds": self.kinds,
                 "total_steps": log["steps"], "segments": self.segments,
                 "note": "the last checkpoint is the shipped model (bf16 weights, fp32 math on the GPU); the "
                         "others are the fp32 training weights at that step, routed in fp32 without TF32"}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
        log["probes"] = {"shape": list(routing.shape), "steps": self.steps}
        cfg_path = out / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["q3lab_note"] = ("mini128 model trained by scripts/train_mini128.py: thinker text weights only (no audio "
                             "tower, vision tower, talker or code2wav tensors)")
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def train(args) -> int:
    """train_mini.train with the MINI128 config and the probe hooks."""
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    return tm.train(args, config=MINI128, hooks=Prober(args, device))


# -- evaluation on the CPU, through q3lab.load ----------------------------------------------------------
@torch.no_grad()
def expert_load(model, streams: dict[str, np.ndarray], seq: int = 512, batch: int = 16) -> torch.Tensor:
    """Times each (layer, expert) is chosen over whole token streams, cut into windows of `seq`: [L, E]."""
    cfg = model.config
    counts = torch.zeros(cfg.num_hidden_layers, cfg.num_experts, dtype=torch.long)

    def hook(l):
        def fn(module, inp, out):
            counts[l] += torch.bincount(out.reshape(-1), minlength=cfg.num_experts)
        return fn

    handles = [layer.mlp.hook_topk_ids.register_forward_hook(hook(l)) for l, layer in enumerate(model.model.layers)]
    try:
        for s in streams.values():
            s = torch.from_numpy(np.asarray(s, dtype=np.int64))
            n = len(s) // seq
            windows = [s[i * seq:(i + 1) * seq] for i in range(n)]
            if len(s) % seq:
                windows.append(s[n * seq:])                    # the tail, its own (shorter) batch
            full = torch.stack(windows[:n]) if n else torch.empty(0, seq, dtype=torch.long)
            for i in range(0, n, batch):
                model(full[i:i + batch])
            if len(windows) > n:
                model(windows[-1][None])
    finally:
        for h in handles:
            h.remove()
    return counts


def coverage(counts: torch.Tensor, top_k: int, top: int = 16) -> dict:
    """Dead experts, routing mass of the `top` busiest experts and experts needed for 90% of the mass, per layer."""
    load = counts.double()
    share = load / load.sum(-1, keepdim=True)                                        # [L, E]
    srt = share.sort(-1, descending=True).values
    cum = srt.cumsum(-1)
    e90 = (cum < 0.9).sum(-1) + 1
    E = counts.shape[1]
    return {"tokens_routed_per_layer": int(counts[0].sum()) // top_k,
            "dead_experts_total": int((counts == 0).sum()),
            "dead_experts_by_layer": (counts == 0).sum(-1).tolist(),
            "min_count": int(counts.min()), "min_count_layer_expert": divmod(int(counts.argmin()), E),
            f"top{top}_mass_by_layer": [round(v, 4) for v in cum[:, top - 1].tolist()],
            f"top{top}_mass_mean": cum[:, top - 1].mean().item(),
            f"top{top}_mass_range": [cum[:, top - 1].min().item(), cum[:, top - 1].max().item()],
            f"top{top}_mass_uniform": top / E,
            "experts_for_90pct_by_layer": e90.tolist(),
            "experts_for_90pct_mean": e90.double().mean().item(),
            "experts_for_90pct_share_mean": e90.double().mean().item() / E,
            "experts_for_90pct_range": [int(e90.min()), int(e90.max())],
            "max_share_by_layer": [round(v, 4) for v in srt[:, 0].tolist()]}


def evaluate(args) -> int:
    """train_mini.evaluate (facts, validation loss, domain routing, samples), then expert coverage on the whole
    validation split and router saturation of the shipped probes."""
    import q3lab
    from q3lab.analysis.saturation import load_probes, router_saturation

    tm.evaluate(args)
    path = Path(args.checkpoint)
    t0 = time.time()
    torch.manual_seed(0)
    model = q3lab.load(path)
    val = tm.load_streams(Path(args.corpus), "val")
    counts = expert_load(model, val)
    result = json.loads(Path(args.json).read_text()) if args.json else {}
    result["coverage_validation_split"] = coverage(counts, model.config.num_experts_per_tok) | {
        "tokens": {d: int(len(s)) for d, s in val.items()}}
    probes = load_probes(path)
    sat = router_saturation(probes)
    mean = sat.groupby(["k", "step"])["saturation"].mean().round(4)
    result["saturation_mean_over_layers"] = {f"top{k}": {int(s): float(v) for s, v in mean[k].items()}
                                             for k in mean.index.levels[0]}
    # The last probe checkpoint must be the shipped model: route the probe tokens again through q3lab.load.
    got = {}
    hooks = [layer.mlp.hook_topk_ids.register_forward_hook(
        lambda m, i, out, l=l: got.__setitem__(l, out)) for l, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(torch.from_numpy(probes.tokens.astype(np.int64)).view(len(probes.index["segments"]), -1))
    for h in hooks:
        h.remove()
    cpu_ids = torch.stack([got[l] for l in range(len(got))], 1).numpy()             # [T, L, A]
    final = probes.ids[-1].astype(np.int64)
    result["probes_final_vs_cpu"] = {
        "top1_equal": float((cpu_ids[..., 0] == final[..., 0]).mean()),
        "top8_set_equal": float((np.sort(cpu_ids, -1) == np.sort(final, -1)).all(-1).mean())}
    result["seconds_coverage"] = round(time.time() - t0, 1)
    text = json.dumps(result, indent=1, ensure_ascii=False)
    print(json.dumps({k: result[k] for k in ("coverage_validation_split", "saturation_mean_over_layers",
                                             "probes_final_vs_cpu")}, indent=1))
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


def probe_options(t) -> None:
    """The train sub-command's probe options."""
    t.add_argument("--probe-seq", type=int, default=512, help="probe tokens per domain (4 domains)")
    t.add_argument("--probe-steps", type=int, nargs="*", default=[20],
                   help="probe at these steps (and always at step 0)")
    t.add_argument("--probe-fractions", type=float, nargs="*", default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8],
                   help="probe at these fractions of the planned schedule (and at the end)")


def main(argv: list[str] | None = None) -> int:
    ap = tm.build_parser(__doc__.splitlines()[0], train_func=train, evaluate_func=evaluate,
                         train_defaults=TRAIN_DEFAULTS, train_extra=probe_options)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
