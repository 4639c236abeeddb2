"""Causal studies of experts, built on `q3lab.intervene`: each returns a tidy DataFrame.

- `causal_trace`: expert-level causal tracing of facts (corrupt the subject, patch a layer's MoE output or one
  expert's contribution from the clean run, measure how much of the answer's log-probability comes back);
- `expert_importance`: observational (selection frequency, mean weight) against causal importance (the drop
  in the facts' answer log-probability when the expert is zero-ablated), with `rank_correlation`;
- `topk_sweep`: quality for k = 1 .. E active experts;
- `knockout_curves`: quality as the most frequent, the most causal or random experts are removed (masked).

Quality is the held-out facts' top-1 accuracy and mean answer log-probability, and the teacher-forced loss
(nats per token) on validation texts.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from q3lab.errors import InputError
from q3lab.analysis.interventions import capture, intervene
from q3lab.analysis.ranking import expected_token_id


# -- batched inputs ---------------------------------------------------------------------------------
def _left_padded(rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, r in enumerate(rows):
        ids[b, T - len(r):] = torch.tensor(r)
        mask[b, T - len(r):] = True
    return ids.to(device), mask.to(device)


class FactBatch:
    """Held-out fact prompts tokenised once: ids/mask [B, T] left-padded and each answer's first token."""

    def __init__(self, tokenizer, items: list[dict], device="cpu"):
        if not items:
            raise InputError("no fact prompts given")
        self.items = items
        self.rows = [tokenizer.encode(it["prompt"]) for it in items]
        self.ids, self.mask = _left_padded(self.rows, device)
        self.targets = torch.tensor([expected_token_id(tokenizer, it["prompt"], it["expected"]) for it in items],
                                    device=device)

    @torch.inference_mode()
    def score(self, model) -> dict[str, float]:
        """top-1 accuracy and mean log-probability of the expected answers, per prompt too."""
        logits = model(self.ids, attention_mask=self.mask, last_only=True)[:, -1].float()
        lp = torch.log_softmax(logits, -1).gather(1, self.targets[:, None])[:, 0]
        top1 = logits.argmax(-1) == self.targets
        return {"top1": float(top1.float().mean()), "logprob": float(lp.mean()), "per_prompt": lp.cpu()}


class TextBatch:
    """Validation texts for a teacher-forced loss: ids/mask [B, T] left-padded (texts cut to max_tokens)."""

    def __init__(self, tokenizer, texts: Sequence[str], max_tokens: int = 64, device="cpu"):
        rows = [tokenizer.encode(t)[:max_tokens] for t in texts]
        rows = [r for r in rows if len(r) >= 2]
        if not rows:
            raise InputError("no validation text of at least 2 tokens")
        self.ids, self.mask = _left_padded(rows, device)

    @torch.inference_mode()
    def loss(self, model) -> float:
        logits = model(self.ids, attention_mask=self.mask).float()                      # [B, T, V]
        lp = torch.log_softmax(logits[:, :-1], -1).gather(2, self.ids[:, 1:, None])[..., 0]
        valid = self.mask[:, :-1] & self.mask[:, 1:]
        return float(-(lp * valid).sum() / valid.sum())


def _quality(model, facts: FactBatch, texts: TextBatch | None, **kw) -> dict:
    with intervene(model, **kw) if kw else nullcontext():
        s = facts.score(model)
        out = {"facts_top1": s["top1"], "facts_logprob": s["logprob"]}
        if texts is not None:
            out["val_loss"] = texts.loss(model)
    return out


# -- causal tracing -----------------------------------------------------------------------------------
def subject_positions(tokenizer, prompt: str, subject: str) -> list[int]:
    """Token positions of `subject` inside `prompt` (its tokens, leading space included)."""
    start = prompt.find(subject)
    if start < 0:
        raise InputError(f"subject {subject!r} is not in the prompt {prompt!r}")
    full = tokenizer.encode(prompt)
    before = tokenizer.encode(prompt[:start].rstrip(" ")) if prompt[:start].strip() else []
    through = tokenizer.encode(prompt[:start + len(subject)])
    if full[:len(through)] != through or through[:len(before)] != before or len(through) <= len(before):
        raise InputError(f"subject {subject!r} does not start and end on token boundaries in {prompt!r}")
    return list(range(len(before), len(through)))


@torch.inference_mode()
def causal_trace(model, tokenizer, items: list[dict], *, subject_key: str = "country", noise: float = 3.0,
                 experts: bool = True, layers: Sequence[int] | None = None, seed: int = 0,
                 min_effect: float = 0.5) -> pd.DataFrame:
    """Expert-level causal tracing: per fact, corrupt the subject's embeddings with Gaussian noise (std `noise`
    times the embedding matrix's std), then restore one site at the last subject token from the clean run:
    a layer's whole MoE output (expert -1) or, with experts=True, one expert's weighted contribution (each
    expert chosen at that token in the clean or the corrupted run). Facts whose corruption costs less than
    `min_effect` nats are skipped. Columns: prompt_id, prompt, layer, expert, restored (share of the clean
    log-probability regained), logprob, clean_logprob, corrupt_logprob."""
    layers = list(range(model.config.num_hidden_layers)) if layers is None else list(layers)
    std = noise * float(model.model.embed_tokens.weight.float().std())
    rows = []
    for n, item in enumerate(items):
        ids = torch.tensor([tokenizer.encode(item["prompt"])], device=model.device)
        target = expected_token_id(tokenizer, item["prompt"], item["expected"])
        subj = subject_positions(tokenizer, item["prompt"], item[subject_key])
        last = subj[-1]
        corrupt_kw = dict(embed_noise=(subj, std, seed + n))

        def lp(logits):
            return float(torch.log_softmax(logits[0, -1].float(), -1)[target])
        clean = capture(model, ids)
        corrupt = capture(model, ids, **corrupt_kw)
        lp_clean, lp_corrupt = lp(clean.logits), lp(corrupt.logits)
        if lp_clean - lp_corrupt < min_effect:
            continue

        def add(layer, expert, value):
            rows.append(dict(prompt_id=n, prompt=item["prompt"], layer=layer, expert=expert,
                             restored=(value - lp_corrupt) / (lp_clean - lp_corrupt), logprob=value,
                             clean_logprob=lp_clean, corrupt_logprob=lp_corrupt))
        for layer in layers:
            with intervene(model, patch=[(layer, None)], patch_from=clean, patch_tokens=[last], **corrupt_kw):
                add(layer, -1, lp(model(ids, last_only=True)))
            if not experts:
                continue
            N = last  # batch 1: the row of the last subject token
            chosen = sorted(set(clean.ids[layer][N].tolist()) | set(corrupt.ids[layer][N].tolist()))
            for e in chosen:
                with intervene(model, patch=[(layer, e)], patch_from=clean, patch_tokens=[last], **corrupt_kw):
                    add(layer, e, lp(model(ids, last_only=True)))
    if not rows:
        raise InputError(f"causal_trace: no fact lost {min_effect} nats to the corruption; raise noise=")
    return pd.DataFrame(rows)


def trace_map(frame: pd.DataFrame, num_layers: int, num_experts: int) -> np.ndarray:
    """[layers, experts] mean restored share of `causal_trace`'s expert rows (NaN where never patched)."""
    m = np.full((num_layers, num_experts), np.nan)
    g = frame[frame.expert >= 0].groupby(["layer", "expert"]).restored.mean()
    for (layer, e), v in g.items():
        m[layer, e] = v
    return m


# -- observational against causal importance ---------------------------------------------------------------
@torch.inference_mode()
def expert_importance(model, tokenizer, items: list[dict], *, layers: Sequence[int] | None = None) -> pd.DataFrame:
    """Per (layer, expert): selection frequency and mean renormalised weight over the facts' tokens (observed),
    and the drop in the mean answer log-probability when that expert is zero-ablated (causal effect).
    Columns: layer, expert, frequency, mean_weight, effect."""
    from q3lab.runtime.recording import record
    c = model.config
    layers = list(range(c.num_hidden_layers)) if layers is None else list(layers)
    facts = FactBatch(tokenizer, items, model.device)
    with record(model) as rec:
        base = facts.score(model)["logprob"]
    f = rec.to_frame()
    tokens = f[(f.layer == 0) & (f["rank"] == 0)].shape[0]
    obs = f.groupby(["layer", "expert"]).weight.agg(["size", "mean"])
    rows = []
    for layer in layers:
        for e in range(c.num_experts):
            size, mean_w = (obs.loc[(layer, e)].tolist() if (layer, e) in obs.index else (0, 0.0))
            with intervene(model, zero=[(layer, e)]):
                effect = base - facts.score(model)["logprob"]
            rows.append(dict(layer=layer, expert=e, frequency=size / tokens, mean_weight=mean_w, effect=effect))
    return pd.DataFrame(rows)


def rank_correlation(x: Sequence[float], y: Sequence[float], *, n_boot: int = 1000, seed: int = 0,
                     level: float = 0.95) -> dict[str, float]:
    """Spearman's rank correlation of x and y with a percentile bootstrap confidence interval."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) != len(y) or len(x) < 3:
        raise InputError("rank_correlation needs two sequences of equal length >= 3")

    def rho(a, b):
        ra, rb = pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy()
        if ra.std() == 0 or rb.std() == 0:
            return float("nan")
        return float(np.corrcoef(ra, rb)[0, 1])
    rng = np.random.default_rng(seed)
    boots = [rho(x[i], y[i]) for i in (rng.integers(0, len(x), len(x)) for _ in range(n_boot))]
    boots = np.array([b for b in boots if not np.isnan(b)])
    lo, hi = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2]) if len(boots) else (np.nan, np.nan)
    return {"rho": rho(x, y), "low": float(lo), "high": float(hi), "n": len(x)}


# -- sweeps ----------------------------------------------------------------------------------------------
def topk_sweep(model, tokenizer, items: list[dict], texts: Sequence[str], ks: Sequence[int] | None = None,
               *, max_tokens: int = 64) -> pd.DataFrame:
    """Facts top-1, mean answer log-probability and validation loss for each number of active experts k."""
    E = model.config.num_experts
    ks = sorted({1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, E} & set(range(1, E + 1))) if ks is None else ks
    facts = FactBatch(tokenizer, items, model.device)
    val = TextBatch(tokenizer, texts, max_tokens, model.device)
    trained = model.config.num_experts_per_tok
    return pd.DataFrame([dict(k=k, trained=k == trained, **_quality(model, facts, val, top_k=k)) for k in ks])


def knockout_curves(model, tokenizer, items: list[dict], texts: Sequence[str], importance: pd.DataFrame,
                    fractions: Sequence[float] = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5), *, seed: int = 0,
                    max_tokens: int = 64) -> pd.DataFrame:
    """Quality as a fraction of each layer's experts is removed (masked from the router), ordered by
    selection frequency ('frequent'), by causal effect ('causal', from `expert_importance`), or at random.
    Columns: order, fraction, removed (per layer), facts_top1, facts_logprob, val_loss."""
    c = model.config
    E = c.num_experts
    facts = FactBatch(tokenizer, items, model.device)
    val = TextBatch(tokenizer, texts, max_tokens, model.device)
    rng = np.random.default_rng(seed)
    layers = sorted(importance.layer.unique())
    orders = {
        "frequent": {l: importance[importance.layer == l].sort_values("frequency", ascending=False,
                                                                      kind="stable").expert.tolist() for l in layers},
        "causal": {l: importance[importance.layer == l].sort_values("effect", ascending=False,
                                                                    kind="stable").expert.tolist() for l in layers},
        "random": {l: rng.permutation(E).tolist() for l in layers},
    }
    rows = []
    for name, order in orders.items():
        for frac in fractions:
            n = min(int(round(frac * E)), E - c.num_experts_per_tok)
            mask = [(l, e) for l in layers for e in order[l][:n]]
            rows.append(dict(order=name, fraction=frac, removed=n, **_quality(model, facts, val, mask=mask)))
    return pd.DataFrame(rows)
