"""Which modality each token of a thinker input carries: "text", "audio", "image", "video" or "special".

The thinker sees one id sequence. Media enter it as runs of placeholder ids (audio_token_id, image_token_id,
video_token_id) whose embeddings the towers overwrite, framed by start/end markers:

    <|audio_start|> <|audio_pad|> x n <|audio_end|>        <|vision_start|> <|image_pad|> x n <|vision_end|>

Labels (MODALITIES):
- "audio" / "image" / "video": a placeholder id of a medium the forward call was given (input_features,
  pixel_values, pixel_values_videos). In audio-in-video the audio placeholders stay "audio".
- "special": the start/end markers of a medium the call was given, and the chat-control tokens
  (<|im_start|>, <|im_end|>, <|endoftext|> where the config names them). They are one label, not named one by
  one, so that per-modality splits compare content (text vs media) and keep the framing tokens apart.
- "text": everything else.

Why the media matter and not only the ids: small checkpoints (data/mini, `q3lab.synth`) put the placeholder
and marker ids at the top of a trained vocabulary, where they are ordinary BPE tokens ("Ġtrans" is
audio_token_id in data/mini). Without media those ids are embedded as text by the model, so they are
labelled text. `media=None` (labelling a bare id sequence) means every medium is present.

Ids come from the checkpoint's config.json (`thinker_config`: audio_token_id, image_token_id, video_token_id,
audio_start_token_id, audio_end_token_id, vision_start_token_id, vision_end_token_id; top level:
im_start_token_id, im_end_token_id), as transformers' Qwen3OmniMoe configs spell them. An id the config
does not give is not used (never guessed).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from q3lab.errors import InputError

MODALITIES = ("text", "audio", "image", "video", "special")
MEDIA = ("audio", "image", "video")
# forward kwargs (transformers' names) that bring each medium into a call
MEDIA_KWARGS = {"input_features": "audio", "pixel_values": "image", "pixel_values_videos": "video"}

_THINKER_KEYS = ("audio_token_id", "image_token_id", "video_token_id", "audio_start_token_id",
                 "audio_end_token_id", "vision_start_token_id", "vision_end_token_id")
_TOP_KEYS = ("im_start_token_id", "im_end_token_id")


@dataclass(frozen=True)
class ModalityTokens:
    """The token ids that carry or frame media (None: the config does not give one)."""
    audio_token_id: int | None = None
    image_token_id: int | None = None
    video_token_id: int | None = None
    audio_start_token_id: int | None = None
    audio_end_token_id: int | None = None
    vision_start_token_id: int | None = None
    vision_end_token_id: int | None = None
    im_start_token_id: int | None = None
    im_end_token_id: int | None = None
    endoftext_token_id: int | None = None

    @classmethod
    def real(cls) -> "ModalityTokens":
        """The released Qwen3-Omni-30B-A3B ids (docs: /work/shared/REFERENCE.md, "Special tokens")."""
        return cls(audio_token_id=151675, image_token_id=151655, video_token_id=151656,
                   audio_start_token_id=151669, audio_end_token_id=151670, vision_start_token_id=151652,
                   vision_end_token_id=151653, im_start_token_id=151644, im_end_token_id=151645,
                   endoftext_token_id=151643)

    @classmethod
    def from_config(cls, cfg: dict[str, Any], *, where: str = "config.json") -> "ModalityTokens":
        """From a full Qwen3-Omni config (ids under `thinker_config`) or a thinker config (ids at top level)."""
        if not isinstance(cfg, dict):
            raise InputError(f"{where}: expected a config object, got {type(cfg).__name__}")
        thinker = cfg.get("thinker_config", cfg)
        if not isinstance(thinker, dict):
            raise InputError(f"{where}: thinker_config is not an object")
        values: dict[str, int | None] = {}
        for key, part in [(k, thinker) for k in _THINKER_KEYS] + [(k, cfg) for k in _TOP_KEYS]:
            v = part.get(key)
            if v is not None and type(v) is not int:
                raise InputError(f"{where}: {key} must be an integer token id, got {v!r:.60}")
            values[key] = v
        return cls(**values)

    @classmethod
    def from_path(cls, path: str | Path) -> "ModalityTokens":
        """From a checkpoint or store folder (its config.json) or a config.json file."""
        from q3lab.jsonio import read_json
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        return cls.from_config(read_json(path, InputError), where=str(path))

    def ids(self) -> dict[str, int]:
        """Field name -> id, for the ids that are set."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def tokens_of(model) -> ModalityTokens:
    """The modality ids of a loaded Thinker: `model.modality_tokens` when set, else its source's config.json
    (`raw_config` of the Checkpoint or Store it was loaded from), else none (every token is text)."""
    toks = getattr(model, "modality_tokens", None)
    if isinstance(toks, ModalityTokens):
        return toks
    raw = getattr(getattr(model, "source", None), "raw_config", None)
    if isinstance(raw, dict):
        return ModalityTokens.from_config(raw, where=f"{getattr(model.source, 'path', '?')}/config.json")
    return ModalityTokens()


def media_of(kwargs: dict[str, Any]) -> frozenset[str]:
    """The media a forward call was given, from its kwargs (transformers' argument names)."""
    return frozenset(m for k, m in MEDIA_KWARGS.items() if kwargs.get(k) is not None)


def modality_labels(input_ids, tokens: ModalityTokens, *, media: Iterable[str] | None = None) -> np.ndarray:
    """Labels (MODALITIES strings, an object array of the ids' shape) for input_ids (any int array/tensor).

    media: the media the call was given ("audio", "image", "video"); None = all of them (see the module
    docstring for why it matters)."""
    ids = input_ids.detach().cpu().numpy() if isinstance(input_ids, torch.Tensor) else np.asarray(input_ids)
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"modality: input_ids must be integer token ids, got {ids.dtype}")
    present = set(MEDIA) if media is None else set(media)
    unknown = present - set(MEDIA)
    if unknown:
        raise InputError(f"modality: unknown media {sorted(unknown)}; expected some of {list(MEDIA)}")
    out = np.full(ids.shape, "text", dtype=object)
    t = tokens
    special = [t.im_start_token_id, t.im_end_token_id, t.endoftext_token_id]
    if "audio" in present:
        special += [t.audio_start_token_id, t.audio_end_token_id]
    if present & {"image", "video"}:
        special += [t.vision_start_token_id, t.vision_end_token_id]
    out[np.isin(ids, [s for s in special if s is not None])] = "special"
    for medium, tid in (("audio", t.audio_token_id), ("image", t.image_token_id), ("video", t.video_token_id)):
        if medium in present and tid is not None:
            out[ids == tid] = medium
    return out


def modality_runs(labels: np.ndarray) -> np.ndarray:
    """Per token of a 1-D label sequence, its index within the run of equal labels it belongs to (0 = the
    token where that modality arrives)."""
    labels = np.asarray(labels, dtype=object)
    n = len(labels)
    if not n:
        return np.zeros(0, np.int64)
    start = np.ones(n, bool)
    start[1:] = labels[1:] != labels[:-1]
    idx = np.arange(n)
    first = np.maximum.accumulate(np.where(start, idx, 0))
    return idx - first


# -- a folder of media, recorded (notebook 08) ----------------------------------------------------------------
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SAMPLING_RATE = 16000       # what the audio feature extractor takes


def read_media(folder: str | Path) -> list[tuple[str, Any]]:
    """(file name, `q3lab.omni.inputs.Audio` or `Image`) for each sound (soundfile: .wav .flac .ogg; channels
    averaged; other sampling rates resampled linearly to 16 kHz) and image (Pillow: .png .jpg .jpeg, as RGB) in
    `folder`, in name order. Other files are left out; a folder without media raises InputError."""
    from q3lab.omni.inputs import Audio, Image
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder of inputs (wav files, images)")
    out: list[tuple[str, Any]] = []
    for path in sorted(folder.iterdir()):
        suffix = path.suffix.lower()
        try:
            if suffix in AUDIO_SUFFIXES:
                import soundfile
                wav, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
                wav = wav.mean(axis=1)
                if rate != SAMPLING_RATE:   # linear: enough for routing statistics, not for listening
                    n = int(round(len(wav) * SAMPLING_RATE / rate))
                    wav = np.interp(np.arange(n) * rate / SAMPLING_RATE, np.arange(len(wav)), wav).astype(np.float32)
                out.append((path.name, Audio(wav, SAMPLING_RATE)))
            elif suffix in IMAGE_SUFFIXES:
                from PIL import Image as PILImage
                with PILImage.open(path) as im:
                    out.append((path.name, Image(np.asarray(im.convert("RGB")))))
        except (OSError, RuntimeError, ValueError) as e:   # soundfile and Pillow raise these for bad files
            raise InputError(f"{path}: cannot read it as {'audio' if suffix in AUDIO_SUFFIXES else 'an image'}: "
                             f"{type(e).__name__}: {str(e)[:160]}") from None
    if not out:
        raise InputError(f"{folder}: no audio ({', '.join(AUDIO_SUFFIXES)}) or image "
                         f"({', '.join(IMAGE_SUFFIXES)}) files")
    return out


def record_media(model, config, media: list[tuple[str, Any]], before: list[int], after: list[int], *,
                 max_new_tokens: int = 0, text_prompt: bool = True):
    """Record the routing of one prompt per medium, `before + <medium> + after` (token ids), through
    `model(**q3lab.omni.inputs.build_inputs(config, ...))`, or `model.generate` of `max_new_tokens` greedy
    tokens; with `text_prompt`, first the text alone (`before + after`) as the text baseline. Prompt ids are
    the file names ("text" for the baseline), domain the medium's kind. Returns the `q3lab.record.Recorder`."""
    from q3lab.omni.inputs import Audio, build_inputs
    from q3lab.record import record
    prompts = ([("text", None)] if text_prompt else []) + list(media)
    with record(model) as rec:
        for name, medium in prompts:
            parts = [before, after] if medium is None else [before, medium, after]
            kwargs = build_inputs(config, parts)
            ids = kwargs.pop("input_ids").to(model.device)
            kwargs = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            rec.set_prompt(name, domain="text" if medium is None else
                           "audio" if isinstance(medium, Audio) else type(medium).__name__.lower())
            with torch.inference_mode():
                if max_new_tokens:
                    model.generate(ids, max_new_tokens, **{k: v for k, v in kwargs.items() if k != "attention_mask"})
                else:
                    model(ids, **kwargs)
    return rec
