"""Next-token rankings: where the expected token lands, top-k tables, and distribution distances."""
from __future__ import annotations

import pandas as pd
import torch


def rank_of(logits: torch.Tensor, token_id: int) -> int:
    """1-based rank of `token_id` in a logit vector [V] (1 = the model's top choice; ties count against it)."""
    return int((logits > logits[token_id]).sum()) + 1


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) in nats between the next-token distributions of two logit tensors [..., V]."""
    lp = torch.log_softmax(p_logits.double(), -1)
    lq = torch.log_softmax(q_logits.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def top_tokens(logits: torch.Tensor, tokenizer=None, k: int = 10) -> pd.DataFrame:
    """The k most likely next tokens of a logit vector [V], with probabilities."""
    probs = torch.softmax(logits.double(), -1)
    p, i = probs.topk(k)
    rows = []
    for r, (pi, ii) in enumerate(zip(p.tolist(), i.tolist()), start=1):
        rows.append(dict(rank=r, token_id=ii, token=tokenizer.decode([ii]) if tokenizer else str(ii), prob=pi))
    return pd.DataFrame(rows)


def expected_token_id(tokenizer, prompt: str, expected: str) -> int:
    """The first token of `expected` as it continues `prompt` (BPE merges can straddle the boundary)."""
    full = tokenizer.encode(prompt + expected)
    head = tokenizer.encode(prompt)
    if full[:len(head)] != head:
        # the boundary merged: fall back to tokenising the continuation on its own
        return tokenizer.encode(expected)[0]
    return full[len(head)]


@torch.no_grad()
def rank_prompts(model, tokenizer, prompts: list[dict]) -> pd.DataFrame:
    """For each {prompt, expected}: rank and probability of the expected next token, and the top choice."""
    rows = []
    for item in prompts:
        ids = torch.tensor([tokenizer.encode(item["prompt"])])
        logits = model(ids, last_only=True)[0, -1]
        target = expected_token_id(tokenizer, item["prompt"], item["expected"])
        top = int(logits.argmax())
        rows.append(dict(prompt=item["prompt"], expected=item["expected"], rank=rank_of(logits, target),
                         prob=float(torch.softmax(logits.double(), -1)[target]),
                         top1=tokenizer.decode([top])))
    return pd.DataFrame(rows)
