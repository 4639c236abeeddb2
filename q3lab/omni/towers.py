"""The thinker's audio tower (AuT) and vision tower, as transformers' own modules filled from q3lab's reader.

`load_towers(src)` builds `Qwen3OmniMoeAudioEncoder` and `Qwen3OmniMoeVisionEncoder` from the checkpoint's
config.json on the meta device (no random init of a billion parameters), then copies every tensor the modules
declare from the weight source (`audio_tower.*`, `visual.*`: the `thinker.` prefix is the source's business).
Tensors that are missing are named all at once, with the shard the index puts them in where it names one.

`Towers.embed` merges the towers' outputs into the token embeddings exactly as transformers' thinker does
(masked_scatter over the pad tokens: audio, then image, then video) and gathers the deepstack features, which
`q3lab.model.Thinker` adds to the hidden states after its first decoder layers at the visual positions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from q3lab.errors import CheckpointError, InputError, Q3LabError, StoreError
from q3lab.omni.inputs import OmniSpec
from q3lab.omni.positions import rope_index
from q3lab.store import TOWER_PREFIXES   # the store format names them



def is_tower_tensor(name: str) -> bool:
    """True for a canonical tower tensor name (`audio_tower.*`, `visual.*`)."""
    return name.startswith(TOWER_PREFIXES)


def thinker_hf_config(raw: dict):
    """transformers' `Qwen3OmniMoeThinkerConfig` of a config.json (nested Qwen3-Omni or a thinker config)."""
    try:
        from transformers import Qwen3OmniMoeThinkerConfig
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise Q3LabError("the towers need transformers: pip install 'q3lab[omni]'") from e
    th = raw.get("thinker_config", raw)
    if not isinstance(th, dict) or not isinstance(th.get("audio_config"), dict) \
            or not isinstance(th.get("vision_config"), dict):
        raise CheckpointError("config.json has no thinker_config.audio_config / vision_config: this checkpoint "
                              "has no towers (load it with towers=False)")
    return Qwen3OmniMoeThinkerConfig(**{k: v for k, v in th.items() if k != "text_config"})


@dataclass
class DeepStack:
    """Vision features added after the first len(embeds) decoder layers: `mask` [B, T] bool (the image and video
    pad positions), `embeds` one [n_visual, D] per layer, in sequence order."""
    mask: torch.Tensor
    embeds: list[torch.Tensor]

    def add(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """x [B, T, D] after decoder layer `layer`, with that layer's features added at the visual positions
        (transformers' `_deepstack_process`: a clone, then an indexed add)."""
        if layer >= len(self.embeds):
            return x
        x = x.clone()
        x[self.mask, :] = x[self.mask, :] + self.embeds[layer].to(x.device, x.dtype)
        return x


class Towers(nn.Module):
    """The audio tower (`audio_tower`) and vision tower (`visual`) with the input spec of their checkpoint."""

    def __init__(self, audio_tower: nn.Module, visual: nn.Module, spec: OmniSpec):
        super().__init__()
        self.audio_tower, self.visual, self.spec = audio_tower, visual, spec

    def audio(self, input_features: torch.Tensor, feature_attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Audio embeddings [n_tokens, D] of input_features [n, mel, frames] (transformers' get_audio_features)."""
        if feature_attention_mask is None:
            raise InputError("input_features need their feature_attention_mask [n_audio, frames] (the processor "
                             "returns it): the tower cuts each audio to its length")
        m = feature_attention_mask.to(input_features.device)
        lens = m.sum(1)
        feats = input_features.permute(0, 2, 1)[m.bool()].permute(1, 0)
        return self.audio_tower(feats, feature_lens=lens, return_dict=True).last_hidden_state

    def vision(self, pixels: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(merged embeddings [n_tokens, D], deepstack features [n_tokens, D] per deepstack layer)."""
        out = self.visual(pixels.type(self.visual.dtype), grid_thw=grid_thw)
        if isinstance(out, tuple):     # earlier transformers: (merged, deepstack features)
            return out[0], list(out[1])
        return out.pooler_output, list(out.deepstack_features)

    def embed(self, input_ids: torch.Tensor, x: torch.Tensor, *, input_features=None, feature_attention_mask=None,
              pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
              video_grid_thw=None) -> tuple[torch.Tensor, DeepStack | None]:
        """The token embeddings x [B, T, D] with the towers' outputs written over their pad tokens, and the
        deepstack features (None without images or videos)."""
        s = self.spec

        def scatter(x, token, feats, what):
            mask = input_ids == token
            n = int(mask.sum())
            if n != feats.shape[0]:
                raise InputError(f"{what}: {n} placeholder tokens (id {token}) in input_ids, but the tower gives "
                                 f"{feats.shape[0]} embeddings (placeholder counts must follow the inputs)")
            return x.masked_scatter(mask[..., None].to(x.device), feats.to(x.device, x.dtype)), mask

        if input_features is not None:
            x, _ = scatter(x, s.audio_token_id, self.audio(input_features, feature_attention_mask), "audio")
        img = vid = None
        if pixel_values is not None:
            _need(image_grid_thw, "image_grid_thw", "pixel_values")
            e, ds = self.vision(pixel_values, image_grid_thw)
            x, m = scatter(x, s.image_token_id, e, "image")
            img = (m, ds)
        if pixel_values_videos is not None:
            _need(video_grid_thw, "video_grid_thw", "pixel_values_videos")
            e, ds = self.vision(pixel_values_videos, video_grid_thw)
            x, m = scatter(x, s.video_token_id, e, "video")
            vid = (m, ds)
        if img is None and vid is None:
            return x, None
        if img is not None and vid is not None:   # one joint run in sequence order, as transformers builds it
            mask = img[0] | vid[0]
            im, vm = img[0][mask], vid[0][mask]
            embeds = []
            for a, b in zip(img[1], vid[1]):
                j = a.new_zeros(int(mask.sum()), a.shape[-1])
                j[im, :] = a
                j[vm, :] = b
                embeds.append(j)
            return x, DeepStack(mask, embeds)
        m, ds = img if img is not None else vid
        return x, DeepStack(m, ds)

    def positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, *, image_grid_thw=None,
                  video_grid_thw=None, feature_attention_mask=None, use_audio_in_video=False,
                  video_second_per_grid=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(position_ids [3, B, T], rope deltas [B, 1]): `q3lab.omni.positions.rope_index`."""
        seqlens = None if feature_attention_mask is None else feature_attention_mask.sum(1)
        return rope_index(input_ids, self.spec, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
                          attention_mask=attention_mask, use_audio_in_video=bool(use_audio_in_video),
                          audio_seqlens=seqlens, second_per_grids=video_second_per_grid)


def _need(value, name: str, given: str) -> None:
    if value is None:
        raise InputError(f"{given} needs {name} (the processor returns both)")


def _fresh_buffers(module: nn.Module) -> None:
    """Recompute the towers' non-persistent buffers (not in the checkpoint; garbage after `to_empty`)."""
    for m in module.modules():
        if hasattr(m, "compute_default_singular_positional_embedding"):     # audio: sinusoid table
            m.positional_embedding = m.compute_default_singular_positional_embedding()
        if hasattr(m, "compute_axial_rope_parameters") and hasattr(m, "inv_freq"):   # vision: 2-D rotary
            inv, _ = m.compute_axial_rope_parameters(m.config)
            m.inv_freq = inv
            m.original_inv_freq = inv.clone()


def build_towers(raw_config: dict, *, device="cpu", dtype=torch.float32) -> Towers:
    """The two towers of a config.json with UNINITIALISED weights (fill them: `fill_towers`)."""
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (Qwen3OmniMoeAudioEncoder,
                                                                            Qwen3OmniMoeVisionEncoder)
    cfg = thinker_hf_config(raw_config)
    cfg.audio_config._attn_implementation = "sdpa"
    cfg.vision_config._attn_implementation = "sdpa"
    with torch.device("meta"):
        audio = Qwen3OmniMoeAudioEncoder._from_config(cfg.audio_config)
        visual = Qwen3OmniMoeVisionEncoder._from_config(cfg.vision_config)
    towers = Towers(audio, visual, OmniSpec.from_config(raw_config))
    towers = towers.to(dtype).to_empty(device=device)
    _fresh_buffers(towers)
    return towers.to(device).eval()


def tower_names(towers: Towers) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape of every tensor the towers read from a checkpoint."""
    return {f"{part}.{n}": tuple(p.shape) for part in ("audio_tower", "visual")
            for n, p in getattr(towers, part).named_parameters()}


@torch.no_grad()
def fill_towers(towers: Towers, src) -> None:
    """Copy every tower tensor from the weight source; missing or mis-shaped ones raise CheckpointError naming
    each of them (and the shard the index lists it in)."""
    params = {f"{part}.{n}": p for part in ("audio_tower", "visual") for n, p in getattr(towers, part).named_parameters()}
    missing, bad, first = [], [], None
    for name, p in params.items():
        try:
            t = src.get(name)
        except (CheckpointError, StoreError) as e:
            missing.append(_key(src, name))
            first = first or str(e)
            continue
        if tuple(t.shape) != tuple(p.shape):
            bad.append(f"{src.source_key(name)} in {src.shard_of(name)}: shape {list(t.shape)}, the tower config "
                       f"implies {list(p.shape)}")
            continue
        p.copy_(t)
    if missing or bad:
        msg = []
        if missing:
            hint = " (a store holds the towers only when extracted with --towers)" \
                if (src.path / "manifest.json").exists() else ""
            missing.sort()
            msg.append(f"{len(missing)} tower tensor(s) missing from {src.path}{hint}: " + ", ".join(missing[:20])
                       + (f", ... ({len(missing) - 20} more)" if len(missing) > 20 else "") + f" (first: {first})")
        if bad:
            msg.append("; ".join(bad[:20]))
        raise CheckpointError(" | ".join(msg))


def _key(src, name: str) -> str:
    """The source's key of a canonical name (the checkpoint's `thinker.` prefix), or the name itself."""
    try:
        return src.source_key(name)
    except KeyError:
        return name


def load_towers(src, *, device="cpu", dtype=torch.float32) -> Towers:
    """The towers of an open weight source (checkpoint or store), filled and in eval mode."""
    towers = build_towers(src.raw_config, device=device, dtype=dtype)
    fill_towers(towers, src)
    towers.requires_grad_(False)
    return towers.eval()
