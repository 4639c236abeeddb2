"""Make bench/data/mini128_heldout_routing.npz: the routing bench/gpu_offload.py replays (CPU, ~30 s).

    q3lab trace data/mini128 --corpus CORPUS --out /tmp/offload_trace --window 640 --stride 640
    python bench/make_offload_trace.py /tmp/offload_trace --corpus CORPUS

CORPUS: the held-out documents of data/heldout.jsonl (the split notebook 06 traces) with at least 640 tokens
(code/colorsys, code/cmd, license/MPL-1.1, code/fnmatch). Each sequence is a document's first 640 tokens, traced
as ONE forward (window = stride = 640), so its routing is a 512-token prompt followed by 128 teacher-forced tokens.
Also stored: the next-layer prediction the offloaded decoder's prefetch makes (layer l's router applied to the
residual stream after layer l - 1's attention, normed with layer l's norm), computed here by the same model;
the script checks that its own forward reproduces the traced routing.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import q3lab  # noqa: E402
from q3lab.runtime.thinker import rms_norm  # noqa: E402
from q3lab.analysis.replay import from_atlas  # noqa: E402
from q3lab.base.tokenizer import load_tokenizer  # noqa: E402

TOKENS = 640


def predictions(model, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(actual [T, L, A], predicted [T, L, A]) from one forward of `ids`: predicted[:, l] = top-k of layer l's
    router on layer l - 1's post-attention residual normed with layer l's post-attention norm."""
    c = model.config
    layers = model.model.layers
    resid = {}
    hooks = [ly.post_attention_layernorm.register_forward_pre_hook(
        lambda m, a, i=i: resid.__setitem__(i, a[0].detach())) for i, ly in enumerate(layers)]
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    act, pred = [], []
    for i, ly in enumerate(layers):
        def topk(x, lay=ly):
            h = rms_norm(x, lay.post_attention_layernorm.weight, c.rms_norm_eps)[0]
            return torch.topk(lay.mlp.gate(h).float(), c.num_experts_per_tok, dim=-1).indices
        act.append(topk(resid[i]))
        pred.append(topk(resid[i - 1]) if i else topk(resid[i]))
    a = torch.stack(act, 1).numpy()
    p = torch.stack(pred, 1).numpy()
    return np.sort(a, -1), p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", type=Path)
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--checkpoint", default="data/mini128")
    ap.add_argument("--out", type=Path, default=Path("bench/data/mini128_heldout_routing.npz"))
    args = ap.parse_args()
    model = q3lab.load(args.checkpoint)
    c = model.config
    tr = from_atlas(args.dataset, TOKENS, c.num_hidden_layers, c.num_experts_per_tok, c.num_experts)
    tok = load_tokenizer(args.checkpoint)
    docs = {d["id"]: d["text"] for d in map(json.loads, args.corpus.read_text().splitlines())}
    preds = []
    for s, name in enumerate(tr.names):
        ids = tok.encode(docs[name])[:TOKENS]
        act, pred = predictions(model, ids)
        same = float((act == np.sort(tr.experts[s], -1)).all(-1).mean())
        print(f"{name}: own forward reproduces the traced expert sets at {same:.4f} of (token, layer); "
              f"next-layer prediction overlap {_overlap(pred[:, 1:], tr.experts[s][:, 1:]):.3f}")
        if same < 0.99:
            sys.exit(f"{name}: the forward disagrees with the trace ({same:.3f})")
        preds.append(pred)
    tr.predicted = np.stack(preds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tr.save(args.out)
    print(f"wrote {args.out}: {tr.shape} ({args.out.stat().st_size / 1e6:.2f} MB)")


def _overlap(pred: np.ndarray, act: np.ndarray) -> float:
    """Mean fraction of the actual top-k found in the predicted top-k."""
    hit = (pred[..., :, None] == act[..., None, :]).any(-2)
    return float(hit.mean())


if __name__ == "__main__":
    main()
