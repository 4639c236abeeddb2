"""Experiments the notebooks run: damage of norm, rotary and routing bugs, reference agreement, lens ranks.

Each returns a tidy DataFrame (one row per prompt and condition) so notebooks stay a few lines long.
"""
from __future__ import annotations

from contextlib import nullcontext
from functools import partial
from typing import Callable, ContextManager

import pandas as pd
import torch

from q3lab.analysis.ablations import ABLATIONS, ablate, missing_final_norm, missing_norms
from q3lab.runtime.thinker import Thinker
from q3lab.analysis.ranking import expected_token_id, kl_divergence, rank_of
from q3lab.analysis.rope_check import wrong_rotary

Condition = Callable[[], ContextManager]


@torch.no_grad()
def compare_conditions(model: Thinker, tokenizer, items: list[dict], conditions: dict[str, Condition]) -> pd.DataFrame:
    """Next-token KL(intact || condition) and the expected token's rank, per prompt and condition.

    The first rows, condition 'intact', hold the unmodified model's ranks (KL 0).
    """
    rows = []
    for n, item in enumerate(items):
        ids = torch.tensor([tokenizer.encode(item["prompt"])], device=model.device)
        target = expected_token_id(tokenizer, item["prompt"], item["expected"])
        intact = model(ids, last_only=True)[0, -1]
        for name, cond in {"intact": nullcontext, **conditions}.items():
            with cond():
                logits = model(ids, last_only=True)[0, -1]
            rows.append(dict(prompt_id=n, prompt=item["prompt"], expected=item["expected"], condition=name,
                             kl=float(kl_divergence(intact, logits)), rank=rank_of(logits, target),
                             top1=tokenizer.decode([int(logits.argmax())])))
    return pd.DataFrame(rows)


def norm_damage(model: Thinker, tokenizer, items: list[dict], layers: list[int]) -> pd.DataFrame:
    """Norms of `layers` reset to ones (both, input only, post-attention only), and every layer's norms."""
    short = ",".join(map(str, layers[:3])) + (",..." if len(layers) > 3 else "")
    every = list(range(model.config.num_hidden_layers))
    return compare_conditions(model, tokenizer, items, {
        f"both norms, layers {short}": partial(missing_norms, model, layers),
        f"input_layernorm, layers {short}": partial(missing_norms, model, layers, ("input_layernorm",)),
        f"post_attention_layernorm, layers {short}": partial(missing_norms, model, layers,
                                                             ("post_attention_layernorm",)),
        "q_norm and k_norm, every layer": partial(missing_norms, model, every, ("q_norm", "k_norm")),
        "both norms, every layer": partial(missing_norms, model, every),
        "final norm": partial(missing_final_norm, model),
    })


def rotary_damage(model: Thinker, tokenizer, items: list[dict]) -> pd.DataFrame:
    """The chunked layout (harmless on text), Llama's rotary base, and no rotary at all."""
    return compare_conditions(model, tokenizer, items, {
        "chunked layout (text)": partial(wrong_rotary, model, "chunked"),
        f"rope_theta {1e4 if model.config.rope_theta != 1e4 else 1e6:,.0f} "
        f"(config: {model.config.rope_theta:,.0f})": partial(wrong_rotary, model, "wrong_theta"),
        "no rotary": partial(wrong_rotary, model, "no_rope"),
    })


def ablation_damage(model: Thinker, tokenizer, items: list[dict]) -> pd.DataFrame:
    """Every known reconstruction bug of q3lab.analysis.ablations against the intact model."""
    return compare_conditions(model, tokenizer, items,
                              {kind: partial(ablate, model, kind) for kind in ABLATIONS})


@torch.no_grad()
def reference_agreement(source, model: Thinker, tokenizer, items: list[dict]) -> pd.DataFrame:
    """Max |logit difference| against transformers' thinker filled with the same tensors, per prompt."""
    from q3lab.oracle import load_reference
    ref = load_reference(source, dtype=model.dtype)
    rows = []
    for item in items:
        ids = torch.tensor([tokenizer.encode(item["prompt"])])
        ours, theirs = model(ids.to(model.device)).cpu(), ref(ids)
        rows.append(dict(prompt=item["prompt"], tokens=ids.shape[1], max_abs_diff=float((ours - theirs).abs().max()),
                         same_top1=bool(torch.equal(ours[0, -1].argmax(), theirs[0, -1].argmax()))))
    return pd.DataFrame(rows)


def lens_ranks(model: Thinker, tokenizer, items: list[dict]) -> pd.DataFrame:
    """Logit-lens rank of each prompt's expected token after every layer (last position)."""
    from q3lab.analysis.lens import logit_lens
    frames = []
    for n, item in enumerate(items):
        ids = torch.tensor([tokenizer.encode(item["prompt"])])
        target = expected_token_id(tokenizer, item["prompt"], item["expected"])
        f = logit_lens(model, ids, target_token=target)
        f = f[f["position"] == f["position"].max()].copy()
        f["prompt_id"], f["prompt"] = n, item["prompt"]
        frames.append(f)
    return pd.concat(frames, ignore_index=True)


def trace_prompts(model: Thinker, tokenizer, items: list[dict], max_new_tokens: int = 0) -> pd.DataFrame:
    """The routing trace of every prompt (prompt id = its index, `domain` label when given), generating
    `max_new_tokens` greedily after each so that decode steps are in the trace too."""
    from q3lab.runtime.recording import trace_prompts as record_prompts
    rec = record_prompts(model, tokenizer, [{**item, "id": n} for n, item in enumerate(items)],
                         max_new_tokens=max_new_tokens, progress=False)
    frame = rec.to_frame()
    if "domain" not in frame.columns:   # no prompt had a label: keep the column, empty
        frame["domain"] = pd.Series([None] * len(frame), dtype=object)
    return frame
