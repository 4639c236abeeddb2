"""mRoPE checks for notebooks: our rotary against transformers', the frequency-to-axis map, wrong variants."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import pandas as pd
import torch

from q3lab.base.config import ThinkerConfig
from q3lab.runtime.thinker import Thinker, mrope_freqs, rope_inv_freq

AXES = ("T", "H", "W")


def axis_map(section: list[int], interleaved: bool = True) -> list[str]:
    """Which position axis (T/H/W) drives each of the head_dim/2 rotary frequencies."""
    n = sum(section)
    pos = torch.stack([torch.full((1, 1), 1), torch.full((1, 1), 2), torch.full((1, 1), 3)])  # distinct per axis
    inv = torch.ones(n)
    f = mrope_freqs(pos, inv, section, interleaved)[0, 0]
    return [AXES[int(v) - 1] for v in f.tolist()]


def ours_cos_sin(config: ThinkerConfig, position_ids: torch.Tensor, interleaved: bool | None = None):
    """cos, sin [B, T, head_dim] as q3lab's model computes them for 3-axis positions [3, B, T]."""
    inv = rope_inv_freq(config.head_dim, config.rope_theta)
    f = mrope_freqs(position_ids, inv, config.mrope_section,
                    config.mrope_interleaved if interleaved is None else interleaved)
    emb = torch.cat([f, f], dim=-1)
    return emb.cos(), emb.sin()


def reference_cos_sin(config: ThinkerConfig, position_ids: torch.Tensor):
    """cos, sin from transformers' `Qwen3OmniMoeThinkerTextRotaryEmbedding` (needs the reference extra)."""
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerTextRotaryEmbedding
    from q3lab.oracle import hf_text_config
    rot = Qwen3OmniMoeThinkerTextRotaryEmbedding(hf_text_config(config))
    x = torch.zeros(1, dtype=torch.float32)
    return rot(x, position_ids)


def compare_with_reference(config: ThinkerConfig, batch: int = 2, tokens: int = 64, seed: int = 0) -> pd.DataFrame:
    """Max |difference| of cos and sin against transformers for text and for random 3-axis positions."""
    g = torch.Generator().manual_seed(seed)
    text = torch.arange(tokens)[None, None].expand(3, batch, tokens)
    multi = torch.randint(0, 4 * tokens, (3, batch, tokens), generator=g)
    rows = []
    for label, pos in (("text (equal axes)", text), ("random 3-axis", multi)):
        oc, os_ = ours_cos_sin(config, pos)
        rc, rs = reference_cos_sin(config, pos)
        rows.append(dict(positions=label, max_abs_diff_cos=float((oc - rc).abs().max()),
                         max_abs_diff_sin=float((os_ - rs).abs().max())))
    return pd.DataFrame(rows)


@contextmanager
def wrong_rotary(model: Thinker, kind: str) -> Iterator[None]:
    """Run the model with a wrong rotary convention: 'wrong_theta' (base 10,000, Llama's, instead of the
    config's; 1,000,000 if the config already uses 10,000),
    'no_rope' (positions ignored), or 'chunked' (Qwen2-VL's non-interleaved layout; same as right for text)."""
    saved_inv, saved_inter = model.inv_freq.clone(), model.config.mrope_interleaved
    try:
        if kind == "wrong_theta":
            wrong = 1e4 if model.config.rope_theta != 1e4 else 1e6
            model.inv_freq.copy_(rope_inv_freq(model.config.head_dim, wrong))
        elif kind == "no_rope":
            model.inv_freq.zero_()
        elif kind == "chunked":
            model.config.mrope_interleaved = False
        else:
            raise ValueError(f"unknown rotary variant {kind!r}")
        yield
    finally:
        model.inv_freq.copy_(saved_inv)
        model.config.mrope_interleaved = saved_inter
