"""A tiny random FULL Qwen3-Omni checkpoint built with transformers: the oracle of the multimodal tests.

`Qwen3OmniMoeForConditionalGeneration` without the talker / code2wav (`enable_audio_output=False`: transformers
then builds the thinker alone), so `save_pretrained` writes the official layout `thinker.audio_tower.*`,
`thinker.visual.*`, `thinker.model.*`, `thinker.lm_head.*` with the nested config.json of the real checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from q3lab.errors import Q3LabError

# special tokens at the top of the tiny vocabulary (the real checkpoint: 151646.. of 152064)
TINY_VOCAB = 256
TOKENS = dict(audio_token_id=TINY_VOCAB - 10, image_token_id=TINY_VOCAB - 9, video_token_id=TINY_VOCAB - 8,
              audio_start_token_id=TINY_VOCAB - 7, vision_start_token_id=TINY_VOCAB - 6,
              user_token_id=TINY_VOCAB - 5)
# not fields of transformers' thinker config, but keys of the real config.json (q3lab.omni.inputs reads them)
END_TOKENS = dict(audio_end_token_id=TINY_VOCAB - 4, vision_end_token_id=TINY_VOCAB - 3)


def tiny_omni_config(*, layers: int = 3, vision_depth: int = 3, deepstack=(0, 1), audio_layers: int = 2):
    """transformers' `Qwen3OmniMoeConfig` of the tiny model: text D=64 (4 heads, hd 16, 8 experts top-2,
    mRoPE sections [4, 2, 2] interleaved), an audio tower of 16 mel bins (n_window 50: 100-frame chunks, the only window transformers' 13-tokens-per-chunk length formula fits) and a
    vision tower of 4x4 patches, 2x2 merge, 2-frame temporal patches, deepstack after vision layers `deepstack`."""
    try:
        from transformers import Qwen3OmniMoeConfig
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise Q3LabError("the omni model needs transformers: pip install 'q3lab[omni]'") from e
    D, V = 64, TINY_VOCAB
    text = dict(vocab_size=V, hidden_size=D, intermediate_size=2 * D, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, moe_intermediate_size=32,
                num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, rms_norm_eps=1e-6,
                max_position_embeddings=1024,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                                 "interleaved": True, "mrope_interleaved": True},
                decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False)
    audio = dict(num_mel_bins=16, encoder_layers=audio_layers, encoder_attention_heads=2, encoder_ffn_dim=32,
                 d_model=16, output_dim=D, downsample_hidden_size=8, n_window=50, n_window_infer=100,
                 max_source_positions=100, conv_chunksize=50)
    vision = dict(depth=vision_depth, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3, out_hidden_size=D,
                  num_position_embeddings=16, deepstack_visual_indexes=list(deepstack))
    thinker = dict(text_config=text, audio_config=audio, vision_config=vision, position_id_per_seconds=13,
                   **TOKENS)
    return Qwen3OmniMoeConfig(thinker_config=thinker, enable_audio_output=False)


def build_tiny_omni(seed: int = 0, **config_kw):
    """The tiny random `Qwen3OmniMoeForConditionalGeneration` (fp32, eval), every thinker tensor perturbed."""
    from transformers import Qwen3OmniMoeForConditionalGeneration
    cfg = tiny_omni_config(**config_kw)
    torch.manual_seed(seed)
    model = Qwen3OmniMoeForConditionalGeneration(cfg).eval().float()
    # Random init leaves norms at exactly 1 and some weights at 0: perturb everything (as tests/hf_reference.py
    # does for the text model), so that a wrong norm, a swapped matrix or a mis-read router cannot hide.
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.thinker.named_parameters():
            if "norm" in name and p.dim() == 1 and not name.endswith("bias"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
    return model


def tiny_omni_checkpoint(out: Path, *, seed: int = 0, max_shard_size: str = "200KB", **config_kw) -> Path:
    """Write the tiny random full Qwen3-Omni model to `out` with `save_pretrained` (several shards, official
    `thinker.*` layout) and return `out`. Deterministic for a seed; a second or so on CPU."""
    out = Path(out)
    model = build_tiny_omni(seed, **config_kw)
    model.save_pretrained(str(out), max_shard_size=max_shard_size)
    cfg_path = out / "config.json"
    raw = json.loads(cfg_path.read_text())
    raw["thinker_config"].update(END_TOKENS)   # as the real config.json carries them
    cfg_path.write_text(json.dumps(raw, indent=2, sort_keys=True))
    return out
