"""The multimodal prefill of `q3lab.model.Thinker`: towers, merged embeddings, 3-axis positions, deepstack.

`Thinker.forward` / `generate` call `prefill_inputs` when any of transformers' multimodal arguments is given;
everything after (the decoder layers, the KV cache, the expert providers, the hook points and so every
recording path) is the text model's, unchanged: the merged embeddings enter where the token embeddings would,
the positions go through the one rotary of `q3lab.step`, and the rope deltas are kept on the KV cache so that
decoding continues from them (`KVCache.rope_deltas`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from q3lab.errors import InputError

# transformers' argument names (Qwen3OmniMoeThinkerForConditionalGeneration.forward), in q3lab's forward too
MULTIMODAL_ARGS = ("input_features", "feature_attention_mask", "pixel_values", "image_grid_thw",
                   "pixel_values_videos", "video_grid_thw", "video_second_per_grid")


def prefill_inputs(model, input_ids: torch.Tensor, position_ids: torch.Tensor | None, cache, attention_mask,
                   mm: dict, use_audio_in_video: bool):
    """(embeddings [B, T, D] with the towers' outputs over their pads, position_ids [3, B, T], deepstack or None)
    of a first call with multimodal inputs; the rope deltas go onto `cache` (when given)."""
    towers = getattr(model, "towers", None)
    if towers is None:
        raise InputError(f"multimodal inputs ({', '.join(sorted(k for k, v in mm.items() if v is not None))}) "
                         f"need the audio/vision towers: load the model with q3lab.load(path, towers=True)")
    if cache is not None and cache.length:
        raise InputError(f"multimodal inputs must come in the first call on a cache (this one holds "
                         f"{cache.length} tokens): their positions start from the prompt's first token")
    dev = model.device
    mm = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in mm.items()}
    ids = input_ids
    x = F.embedding(ids, model.model.embed_tokens.weight)
    with torch.no_grad():
        x, deepstack = towers.embed(ids, x, input_features=mm.get("input_features"),
                                    feature_attention_mask=mm.get("feature_attention_mask"),
                                    pixel_values=mm.get("pixel_values"), image_grid_thw=mm.get("image_grid_thw"),
                                    pixel_values_videos=mm.get("pixel_values_videos"),
                                    video_grid_thw=mm.get("video_grid_thw"))
    pos, deltas = towers.positions(ids, attention_mask, image_grid_thw=mm.get("image_grid_thw"),
                                   video_grid_thw=mm.get("video_grid_thw"),
                                   feature_attention_mask=mm.get("feature_attention_mask"),
                                   use_audio_in_video=use_audio_in_video,
                                   video_second_per_grid=mm.get("video_second_per_grid"))
    if position_ids is not None:        # the caller's own positions win (as in transformers), deltas not added
        pos = position_ids if position_ids.dim() == 3 else position_ids[None].expand(3, *position_ids.shape)
    if cache is not None:
        cache.rope_deltas = deltas.to(dev)
    return x.to(model.dtype), pos, deepstack
