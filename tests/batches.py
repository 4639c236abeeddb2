"""Prompt batches shared by the decode tests."""
from __future__ import annotations

import torch


def left_padded(vocab: int, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random prompts [B, max(lengths)] (pad id 0) and their attention mask."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, T - n:] = torch.randint(0, vocab, (n,), generator=g)
        mask[b, T - n:] = 1
    return ids, mask
