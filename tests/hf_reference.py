"""Build tiny Qwen3-Omni checkpoints with Hugging Face transformers, the reference oracle."""
from __future__ import annotations

from pathlib import Path

import torch


def tiny_text_config(*, layers: int = 2, experts: int = 8, top_k: int = 2, hidden: int = 64,
                     heads: int = 4, kv_heads: int = 2, head_dim: int = 16, vocab: int = 256,
                     moe_intermediate: int = 32, mrope_section=(4, 2, 2), norm_topk_prob: bool = True,
                     max_position_embeddings: int = 512) -> dict:
    assert sum(mrope_section) == head_dim // 2
    return dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        moe_intermediate_size=moe_intermediate, num_experts=experts, num_experts_per_tok=top_k,
        norm_topk_prob=norm_topk_prob, rms_norm_eps=1e-6, max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(mrope_section),
                         "interleaved": True, "mrope_interleaved": True},
        decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False,
    )


def build_full_model(seed: int = 0, **text_kw):
    """A full Qwen3OmniMoeForConditionalGeneration (thinker + talker + code2wav), tiny, random, fp32."""
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

    text = tiny_text_config(**text_kw)
    hidden, vocab = text["hidden_size"], text["vocab_size"]
    audio = dict(num_mel_bins=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, d_model=16,
                 output_dim=hidden, downsample_hidden_size=8, n_window=5, n_window_infer=10,
                 max_source_positions=100, conv_chunksize=50)
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=hidden, num_position_embeddings=16,
                  deepstack_visual_indexes=[0])
    thinker = dict(text_config=text, audio_config=audio, vision_config=vision,
                   audio_token_id=vocab - 10, image_token_id=vocab - 9, video_token_id=vocab - 8,
                   audio_start_token_id=vocab - 7, vision_start_token_id=vocab - 6, user_token_id=vocab - 5)
    talker_text = dict(tiny_text_config(layers=1, experts=4, top_k=2, hidden=32, heads=2, kv_heads=1, head_dim=16,
                                        vocab=64, moe_intermediate=16), shared_expert_intermediate_size=16)
    talker = dict(text_config=talker_text, thinker_hidden_size=hidden, spatial_merge_size=2,
                  code_predictor_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                             head_dim=16, num_code_groups=4),
                  audio_token_id=vocab - 10, image_token_id=vocab - 9, video_token_id=vocab - 8,
                  audio_start_token_id=vocab - 7, vision_start_token_id=vocab - 6)
    code2wav = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                    intermediate_size=64, codebook_size=64, num_quantizers=4, decoder_dim=32,
                    upsample_rates=[2, 2], upsampling_ratios=[2, 2])
    cfg = Qwen3OmniMoeConfig(thinker_config=thinker, talker_config=talker, code2wav_config=code2wav,
                             enable_audio_output=True)
    torch.manual_seed(seed)
    model = Qwen3OmniMoeForConditionalGeneration(cfg).eval().float()
    # Random init gives norms of exactly 1 and router weights of 0 in places: perturb everything so that
    # a wrong norm, a swapped matrix or a mis-read router cannot hide.
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.thinker.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
    return model


def save_full(path: Path, seed: int = 0, max_shard_size: str = "200KB", **text_kw):
    model = build_full_model(seed, **text_kw)
    model.save_pretrained(str(path), max_shard_size=max_shard_size)
    return model


def build_thinker_only(seed: int = 0, **text_kw):
    from transformers import Qwen3OmniMoeThinkerConfig, Qwen3OmniMoeThinkerForConditionalGeneration
    full = build_full_model(seed, **text_kw)
    cfg = full.config.thinker_config
    model = Qwen3OmniMoeThinkerForConditionalGeneration(cfg).eval().float()
    model.load_state_dict(full.thinker.state_dict())
    return model
