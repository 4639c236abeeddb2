"""q3lab's multimodal thinker against transformers' on one device (CUDA when present): the tiny random full
Qwen3-Omni of tests/test_omni.py, fp32 and bf16 logits, greedy continuations, and one timed prefill.

    python bench/omni_cuda.py [--out DIR]      # prints a table; writes omni_cuda.json into DIR
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import q3lab  # noqa: E402
from q3lab.omni.inputs import Audio, Image, Video, build_inputs  # noqa: E402
from q3lab.omni.synthetic import tiny_omni_checkpoint  # noqa: E402


def cases():
    rs = np.random.RandomState(0)

    def frames(t, h, w):
        return (rs.rand(t, h, w, 3) * 255).astype(np.uint8)
    wav = Audio((rs.randn(24000) * 0.1).astype(np.float32))
    return {"audio": [[1, 2, 3], wav, [4, 5]], "image": [[1, 2], Image(frames(1, 24, 16)[0]), [7, 8, 9]],
            "video": [[1], Video(frames(5, 16, 24), fps=3.0), [3]],
            "audio_in_video": [[1], Video(frames(4, 16, 16), fps=2.0,
                                          audio=Audio((rs.randn(16000) * 0.1).astype(np.float32))), [5]],
            "mixed": [[1], Image(frames(1, 16, 16)[0]), [2], wav, [3], Video(frames(4, 16, 16), fps=2.0), [4]]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import transformers
    from transformers import Qwen3OmniMoeForConditionalGeneration
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rows, ok = [], True
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = tiny_omni_checkpoint(Path(tmp) / "tiny")
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, None)):
            hf = Qwen3OmniMoeForConditionalGeneration.from_pretrained(str(ckpt), dtype=dtype).thinker.to(dev).eval()
            ours = q3lab.load(ckpt, towers=True, device=dev, dtype=dtype)
            for name, parts in cases().items():
                inp = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v)
                       for k, v in build_inputs(ckpt, parts).items()}
                if dtype != torch.float32:
                    for k in ("input_features", "pixel_values", "pixel_values_videos"):
                        if k in inp:
                            inp[k] = inp[k].to(dtype)
                with torch.no_grad():
                    theirs = hf(**inp).logits.float()
                mine = ours(**inp)
                diff = (mine - theirs).abs().max().item()
                g = hf.generate(**inp, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
                mm = {k: v for k, v in inp.items() if k != "input_ids"}
                same = ours.generate(inp["input_ids"], 4, **mm).tolist() == g.tolist()
                if dev == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(5):
                    ours(**inp)
                if dev == "cuda":
                    torch.cuda.synchronize()
                ms = (time.perf_counter() - t0) / 5 * 1e3
                good = (diff < tol if tol else True) and (same or tol is None)
                ok &= good
                rows.append(dict(device=dev, dtype=str(dtype).split(".")[-1], case=name, max_abs_diff=diff,
                                 greedy_equal=same, prefill_ms=round(ms, 2), ok=good))
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, device {dev}")
    for r in rows:
        print(f"{r['dtype']:9s} {r['case']:15s} max|diff| {r['max_abs_diff']:.3g}  greedy equal {r['greedy_equal']}  "
              f"prefill {r['prefill_ms']} ms  {'OK' if r['ok'] else 'FAIL'}")
    if args.out:
        Path(args.out, "omni_cuda.json").write_text(json.dumps(rows, indent=1))
    print("ALL OK" if ok else "SOME FAILED (fp32 must be < 1e-4 with equal greedy tokens; bf16 is informative)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
