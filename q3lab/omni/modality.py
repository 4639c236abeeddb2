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
import pandas as pd
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
        from q3lab.base.jsonio import read_json
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
    the file names ("text" for the baseline), domain the medium's kind. Returns the `q3lab.runtime.recording.Recorder`."""
    from q3lab.omni.inputs import Audio, build_inputs
    from q3lab.runtime.recording import record
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


# -- positions of a real multimodal layout (notebook 03) ----------------------------------------------------------
# A user turn in the released chat template: <|im_start|> user \n ... <|im_end|> \n <|im_start|> assistant \n
# (872 = "user", 77091 = "assistant": the config's user/assistant_token_id; 198 = "\n" in Qwen's vocabulary)
REAL_TURN = ([151644, 872, 198], [151645, 198, 151644, 77091, 198])


def real_spec():
    """`q3lab.omni.inputs.OmniSpec` of the released checkpoint: its token ids and tower sizes (128 mel bins,
    n_window 50, 16-pixel patches merged 2x2, 2-frame temporal patches, 13 positions per second)."""
    from q3lab.omni.inputs import OmniSpec
    r = ModalityTokens.real()
    return OmniSpec(audio_token_id=r.audio_token_id, audio_start_token_id=r.audio_start_token_id,
                    audio_end_token_id=r.audio_end_token_id, image_token_id=r.image_token_id,
                    video_token_id=r.video_token_id, vision_start_token_id=r.vision_start_token_id,
                    vision_end_token_id=r.vision_end_token_id, num_mel_bins=128, n_window=50, patch_size=16,
                    spatial_merge_size=2, temporal_patch_size=2, position_id_per_seconds=13.0)


def reference_rope_index(spec, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' own `get_rope_index` (Qwen3-Omni's thinker, the processor's kwargs) for `inputs`, run
    without building a model: it reads only the config's token ids, merge size, window and position rate."""
    from types import MethodType, SimpleNamespace

    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeThinkerConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import \
        Qwen3OmniMoePreTrainedModelForConditionalGeneration as Omni
    cfg = Qwen3OmniMoeThinkerConfig(audio_token_id=spec.audio_token_id, image_token_id=spec.image_token_id,
                                    video_token_id=spec.video_token_id,
                                    audio_start_token_id=spec.audio_start_token_id,
                                    position_id_per_seconds=int(spec.position_id_per_seconds),
                                    audio_config={"n_window": spec.n_window},
                                    vision_config={"spatial_merge_size": spec.spatial_merge_size})
    cfg.vision_start_token_id = spec.vision_start_token_id     # a key of config.json, not a declared field
    fake = SimpleNamespace(config=cfg, spatial_merge_size=spec.spatial_merge_size)
    fake.get_llm_pos_ids_for_vision = MethodType(Omni.get_llm_pos_ids_for_vision, fake)   # the one helper it calls
    fam = inputs.get("feature_attention_mask")
    return Omni.get_rope_index(fake, inputs["input_ids"], inputs.get("image_grid_thw"),
                               inputs.get("video_grid_thw"), inputs.get("attention_mask"),
                               bool(inputs.get("use_audio_in_video", False)),
                               None if fam is None else fam.sum(-1), inputs.get("video_second_per_grid"))


def positions_check(media: list[tuple[str, Any]], spec=None, *, turn: tuple[list[int], list[int]] = REAL_TURN,
                    question: list[int] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """q3lab's 3-axis positions (`q3lab.omni.positions.rope_index`) against transformers' `get_rope_index` for
    one user turn holding `media` (from `read_media`) in the real checkpoint's layout (default spec:
    `real_spec()`). Returns (tokens: token_index, token, modality, t, h, w, t_ref, h_ref, w_ref;
    summary: one row per axis with tokens, max_abs_diff, equal, and a row "rope_delta" for the offset that
    decoding continues from)."""
    from q3lab.omni.inputs import build_inputs
    from q3lab.omni.positions import rope_index
    spec = spec or real_spec()
    question = [785, 3405, 30] if question is None else question      # a few ordinary text ids
    parts = [turn[0]] + [m for _, m in media] + [question, turn[1]]
    inputs = build_inputs(spec, parts)
    fam = inputs.get("feature_attention_mask")
    ours, d_ours = rope_index(inputs["input_ids"], spec, image_grid_thw=inputs.get("image_grid_thw"),
                              video_grid_thw=inputs.get("video_grid_thw"),
                              attention_mask=inputs.get("attention_mask"),
                              use_audio_in_video=bool(inputs.get("use_audio_in_video", False)),
                              audio_seqlens=None if fam is None else fam.sum(-1),
                              second_per_grids=inputs.get("video_second_per_grid"))
    ref, d_ref = reference_rope_index(spec, inputs)
    ids = inputs["input_ids"][0]
    toks = ModalityTokens(audio_token_id=spec.audio_token_id, image_token_id=spec.image_token_id,
                          video_token_id=spec.video_token_id, audio_start_token_id=spec.audio_start_token_id,
                          audio_end_token_id=spec.audio_end_token_id,
                          vision_start_token_id=spec.vision_start_token_id,
                          vision_end_token_id=spec.vision_end_token_id, im_start_token_id=REAL_TURN[0][0],
                          im_end_token_id=REAL_TURN[1][0])
    frame = pd.DataFrame({"token_index": np.arange(len(ids), dtype=np.int32), "token": ids.numpy().astype(np.int32),
                          "modality": modality_labels(ids, toks)})
    for k, axis in enumerate("thw"):
        frame[axis] = ours[k, 0].to(torch.int64).numpy()
        frame[f"{axis}_ref"] = ref[k, 0].to(torch.int64).numpy()
    rows = [dict(check=axis, tokens=len(frame), max_abs_diff=int((frame[axis] - frame[f"{axis}_ref"]).abs().max()),
                 equal=bool((frame[axis] == frame[f"{axis}_ref"]).all())) for axis in "thw"]
    dd = int((d_ours.to(torch.int64).reshape(-1) - d_ref.to(torch.int64).reshape(-1)).abs().max())
    rows.append(dict(check="rope_delta", tokens=len(frame), max_abs_diff=dd, equal=dd == 0))
    return frame, pd.DataFrame(rows)
