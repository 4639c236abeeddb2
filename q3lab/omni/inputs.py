"""Multimodal inputs for the thinker, as transformers' Qwen3-Omni processor makes them.

`build_inputs(config, parts)` turns a sequence of parts (token ids, `Audio`, `Image`, `Video`) into the keyword
arguments of `Thinker.forward` / `generate` and of transformers' `Qwen3OmniMoeThinkerForConditionalGeneration`
(input_ids, attention_mask, input_features, feature_attention_mask, pixel_values, image_grid_thw,
pixel_values_videos, video_grid_thw, video_second_per_grid, use_audio_in_video), with the placeholder runs the
processor writes:

- audio: <|audio_start|> <|audio_pad|> * n <|audio_end|>, n = `audio_token_count(frames, n_window)` (the audio
  tower's output length: 13 tokens per 2*n_window mel frames, plus the remainder's three stride-2 convolutions);
- image: <|vision_start|> <|image_pad|> * (t*h*w / merge^2) <|vision_end|>;
- video: <|vision_start|> <|video_pad|> * (t*h*w / merge^2) <|vision_end|>;
- video with its audio (use_audio_in_video): <|vision_start|> <|audio_start|> video and audio pads interleaved by
  time (each video grid at t * second_per_grid * position_id_per_seconds, one position per audio token; ties go
  to video) <|audio_end|> <|vision_end|>.

Mel features are transformers' `WhisperFeatureExtractor` (the processor's feature extractor) with the tower's
mel-bin count; image patches are transformers' `Qwen2VLImageProcessorPil` (resize, rescale, normalise,
patchify) with the tower's patch sizes; video frames are normalised and patchified here in the same layout
(frames must already be multiples of patch_size * merge_size; no resize).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from q3lab.errors import CheckpointError, InputError

# the real checkpoint's ids (config.json thinker_config); a config without them falls back to these
DEFAULT_IDS = dict(audio_token_id=151646, audio_start_token_id=151647, audio_end_token_id=151648,
                   image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                   vision_end_token_id=151653)
# Qwen3-Omni's preprocessor_config.json normalises pixels with mean = std = 0.5
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class OmniSpec:
    """What input building needs from a checkpoint's config.json: special token ids, the audio tower's mel bins
    and window, the vision tower's patch sizes, and the temporal position rate."""
    audio_token_id: int
    audio_start_token_id: int
    audio_end_token_id: int
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    num_mel_bins: int = 128
    n_window: int = 50
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    in_channels: int = 3
    position_id_per_seconds: float = 13.0

    @classmethod
    def from_config(cls, cfg: dict[str, Any] | str | Path) -> "OmniSpec":
        """From a config.json dict (nested Qwen3-Omni or a thinker config) or a checkpoint/store folder."""
        if not isinstance(cfg, dict):
            from q3lab.config import read_json
            path = Path(cfg)
            cfg = read_json(path / "config.json" if path.is_dir() else path)
        th = cfg.get("thinker_config", cfg)
        if not isinstance(th, dict) or not isinstance(th.get("audio_config"), dict) \
                or not isinstance(th.get("vision_config"), dict):
            raise CheckpointError("config.json has no thinker_config.audio_config / vision_config: a text-only "
                             "checkpoint has no towers for multimodal input")
        au, vi = th["audio_config"], th["vision_config"]
        ids = {k: int(th.get(k, v)) for k, v in DEFAULT_IDS.items()}
        return cls(**ids, num_mel_bins=int(au.get("num_mel_bins", 128)), n_window=int(au.get("n_window", 50)),
                   patch_size=int(vi.get("patch_size", 16)), spatial_merge_size=int(vi.get("spatial_merge_size", 2)),
                   temporal_patch_size=int(vi.get("temporal_patch_size", 2)),
                   in_channels=int(vi.get("in_channels", 3)),
                   position_id_per_seconds=float(th.get("position_id_per_seconds", 13)))


@dataclass
class Audio:
    """A mono waveform [samples] (float, -1..1) at `sampling_rate` (the feature extractor wants 16 kHz)."""
    wav: np.ndarray
    sampling_rate: int = 16000


@dataclass
class Image:
    """An image: [H, W, C] uint8 (or a PIL image)."""
    pixels: Any


@dataclass
class Video:
    """Video frames [T, H, W, C] uint8 sampled at `fps`; with `audio`, its sound track (use_audio_in_video)."""
    frames: np.ndarray
    fps: float = 2.0
    audio: Audio | None = None


def audio_token_count(frames, n_window: int = 50):
    """The audio tower's output length for `frames` mel frames (int or tensor): transformers'
    `_get_feat_extract_output_lengths` (13 tokens per full chunk of 2*n_window frames)."""
    chunk = n_window * 2
    leave = frames % chunk
    feat = (leave - 1) // 2 + 1
    return ((feat - 1) // 2 + 1 - 1) // 2 + 1 + (frames // chunk) * 13


def audio_features(audios: Sequence[Audio], spec: OmniSpec) -> dict[str, torch.Tensor]:
    """input_features [n, mel, frames] and feature_attention_mask [n, frames] (int) of waveforms, padded to the
    longest, as the processor's `WhisperFeatureExtractor` makes them."""
    from transformers import WhisperFeatureExtractor
    rates = {a.sampling_rate for a in audios}
    if rates != {16000}:
        raise InputError(f"audio sampling rate(s) {sorted(rates)}: the feature extractor needs 16000 Hz (resample "
                         f"first)")
    wavs = []
    for i, a in enumerate(audios):
        w = np.asarray(a.wav, dtype=np.float32)
        if w.ndim != 1 or w.size < 160:
            raise InputError(f"audio {i}: expected a mono waveform of at least 160 samples, got shape {list(w.shape)}")
        wavs.append(w)
    fe = WhisperFeatureExtractor(feature_size=spec.num_mel_bins, sampling_rate=16000)
    out = fe(wavs, sampling_rate=16000, padding=True, truncation=False, return_attention_mask=True,
             return_tensors="pt")
    return {"input_features": out["input_features"].float(), "feature_attention_mask": out["attention_mask"].long()}


def image_features(images: Sequence[Image], spec: OmniSpec, *, min_pixels: int | None = None,
                   max_pixels: int | None = None, mean=IMAGE_MEAN, std=IMAGE_STD) -> dict[str, torch.Tensor]:
    """pixel_values [patches, C*tp*ps*ps] and image_grid_thw [n, 3] by transformers' `Qwen2VLImageProcessorPil`
    with the vision tower's patch sizes (min/max pixels default to 4 and 16384 merged patches)."""
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    except ImportError:   # transformers before the Pillow/torchvision backend split: the class is the Pillow one
        from transformers import Qwen2VLImageProcessor as Qwen2VLImageProcessorPil
    f = spec.patch_size * spec.spatial_merge_size
    proc = Qwen2VLImageProcessorPil(patch_size=spec.patch_size, merge_size=spec.spatial_merge_size,
                                    temporal_patch_size=spec.temporal_patch_size, image_mean=list(mean),
                                    image_std=list(std), min_pixels=min_pixels or 4 * f * f,
                                    max_pixels=max_pixels or 16384 * f * f)
    out = proc(images=[im.pixels for im in images], return_tensors="pt")
    return {"pixel_values": out["pixel_values"].float(), "image_grid_thw": out["image_grid_thw"].long()}


def patchify_frames(frames: torch.Tensor, spec: OmniSpec) -> tuple[torch.Tensor, list[int]]:
    """Normalised frames [T, C, H, W] -> patches [t*h*w, C*tp*ps*ps] and the grid [t, h, w], in the processor's
    layout (merge blocks contiguous); T is padded to a multiple of temporal_patch_size with the last frame."""
    T, C, H, W = frames.shape
    ps, m, tp = spec.patch_size, spec.spatial_merge_size, spec.temporal_patch_size
    if H % (ps * m) or W % (ps * m):
        raise InputError(f"video frames of {H}x{W}: height and width must be multiples of patch_size * "
                         f"spatial_merge_size = {ps * m} (resize them first)")
    if T % tp:
        frames = torch.cat([frames, frames[-1:].expand(tp - T % tp, -1, -1, -1)])
    t, gh, gw = frames.shape[0] // tp, H // ps, W // ps
    p = frames.reshape(t, tp, C, gh // m, m, ps, gw // m, m, ps).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return p.reshape(t * gh * gw, C * tp * ps * ps).contiguous(), [t, gh, gw]


def video_features(videos: Sequence[Video], spec: OmniSpec, *, mean=IMAGE_MEAN,
                   std=IMAGE_STD) -> dict[str, torch.Tensor]:
    """pixel_values_videos, video_grid_thw [n, 3] and video_second_per_grid [n] (temporal_patch_size / fps)."""
    patches, grids, spg = [], [], []
    for i, v in enumerate(videos):
        fr = np.asarray(v.frames)
        if fr.ndim != 4 or fr.shape[-1] != spec.in_channels:
            raise InputError(f"video {i}: expected frames [T, H, W, {spec.in_channels}], got shape {list(fr.shape)}")
        if not v.fps > 0:
            raise InputError(f"video {i}: fps must be > 0, got {v.fps}")
        x = torch.from_numpy(fr.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
        x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
        p, g = patchify_frames(x, spec)
        patches.append(p)
        grids.append(g)
        spg.append(spec.temporal_patch_size / v.fps)
    return {"pixel_values_videos": torch.cat(patches), "video_grid_thw": torch.tensor(grids, dtype=torch.long),
            "video_second_per_grid": torch.tensor(spg, dtype=torch.float)}


def interleave_audio_video(grid_thw, n_audio: int, second_per_grid: float, spec: OmniSpec) -> list[str]:
    """The order of video ('v') and audio ('a') placeholders of one video with its audio, as the processor's
    `replace_video_with_audio_token`: by time, video grids first on ties."""
    t, h, w = (int(x) for x in grid_thw)
    per = (h // spec.spatial_merge_size) * (w // spec.spatial_merge_size)
    vt = [k * second_per_grid * spec.position_id_per_seconds for k in range(t) for _ in range(per)]
    out, i, j = [], 0, 0
    while i < len(vt) and j < n_audio:
        if vt[i] <= j:
            out.append("v")
            i += 1
        else:
            out.append("a")
            j += 1
    return out + ["v"] * (len(vt) - i) + ["a"] * (n_audio - j)


def build_inputs(config: OmniSpec | dict | str | Path, parts: Sequence) -> dict[str, Any]:
    """The keyword arguments of one prompt (batch 1) from `parts`, in order: token ids (a list of ints),
    `Audio`, `Image`, `Video` (with `audio`: the sound track interleaved, use_audio_in_video=True; every video
    must then carry its audio, as transformers' flag is one per call). Keys not used are left out."""
    spec = config if isinstance(config, OmniSpec) else OmniSpec.from_config(config)
    videos = [p for p in parts if isinstance(p, Video)]
    with_audio = [v.audio is not None for v in videos]
    if any(with_audio) and not all(with_audio):
        raise InputError("build_inputs: some videos carry audio and some do not; use_audio_in_video is one flag "
                         "per call (transformers' thinker), so give every video its audio or none")
    # audio features in order of appearance in the sequence (masked_scatter fills the pads in that order)
    seq_audio = [a for p in parts for a in ([p] if isinstance(p, Audio) else
                                            [p.audio] if isinstance(p, Video) and p.audio is not None else [])]
    out: dict[str, Any] = {}
    n_audio_tokens: list[int] = []
    if seq_audio:
        af = audio_features(seq_audio, spec)
        out.update(af)
        n_audio_tokens = [int(n) for n in audio_token_count(af["feature_attention_mask"].sum(-1), spec.n_window)]
    images = [p for p in parts if isinstance(p, Image)]
    if images:
        out.update(image_features(images, spec))
    if videos:
        out.update(video_features(videos, spec))
    s, m2 = spec, spec.spatial_merge_size ** 2
    ids: list[int] = []
    ai = ii = vi = 0
    for k, p in enumerate(parts):
        if isinstance(p, Audio):
            ids += [s.audio_start_token_id] + [s.audio_token_id] * n_audio_tokens[ai] + [s.audio_end_token_id]
            ai += 1
        elif isinstance(p, Image):
            n = int(out["image_grid_thw"][ii].prod()) // m2
            ids += [s.vision_start_token_id] + [s.image_token_id] * n + [s.vision_end_token_id]
            ii += 1
        elif isinstance(p, Video):
            g = out["video_grid_thw"][vi]
            if p.audio is None:
                ids += [s.vision_start_token_id] + [s.video_token_id] * (int(g.prod()) // m2) + [s.vision_end_token_id]
            else:
                order = interleave_audio_video(g, n_audio_tokens[ai], float(out["video_second_per_grid"][vi]), s)
                ids += [s.vision_start_token_id, s.audio_start_token_id]
                ids += [s.video_token_id if c == "v" else s.audio_token_id for c in order]
                ids += [s.audio_end_token_id, s.vision_end_token_id]
                ai += 1
            vi += 1
        elif isinstance(p, (list, tuple)) and all(isinstance(t, (int, np.integer)) for t in p):
            ids += [int(t) for t in p]
        else:
            raise InputError(f"build_inputs: part {k} is a {type(p).__name__}; expected token ids (list of int), "
                             f"Audio, Image or Video")
    out["input_ids"] = torch.tensor([ids], dtype=torch.long)
    out["attention_mask"] = torch.ones_like(out["input_ids"])
    if videos:
        out["use_audio_in_video"] = bool(with_audio and all(with_audio))
    return out
