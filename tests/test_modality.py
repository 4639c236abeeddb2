"""Modality labels (q3lab.omni.modality), the record and atlas `modality` columns, and the modality splits of
q3lab.analysis.metrics / q3lab.atlas.queries against hand computations."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import q3lab
from q3lab.analysis import metrics as M
from q3lab.atlas import open_dataset
from q3lab.atlas import queries as Q
from q3lab.atlas.dataset import DatasetWriter, part_name, routing_table
from q3lab.errors import InputError
from q3lab.omni.modality import ModalityTokens, modality_labels, modality_runs
from q3lab.runtime.recording import load_trace, record, save_trace
from q3lab.weights.synthetic import synth

ROOT = Path(__file__).resolve().parents[1]
REAL = ModalityTokens.real()


# -- labels -----------------------------------------------------------------------------------------
def test_labels_of_a_hand_made_sequence():
    # <|im_start|> user <|vision_start|> <|image_pad|> x2 <|vision_end|> <|audio_start|> <|audio_pad|> x2
    # <|audio_end|> text <|vision_start|> <|video_pad|> <|vision_end|> <|im_end|>
    ids = [151644, 872, 151652, 151655, 151655, 151653, 151669, 151675, 151675, 151670, 9707, 151652, 151656,
           151653, 151645]
    want = ["special", "text", "special", "image", "image", "special", "special", "audio", "audio", "special",
            "text", "special", "video", "special", "special"]
    assert modality_labels(ids, REAL).tolist() == want
    assert modality_labels(torch.tensor([ids, ids]), REAL).shape == (2, len(ids))
    # a call that got only an image: audio/video placeholders and the audio markers are text to the model
    only_image = modality_labels(ids, REAL, media={"image"}).tolist()
    assert only_image == ["special", "text", "special", "image", "image", "special", "text", "text", "text",
                          "text", "text", "special", "text", "special", "special"]
    # no media at all: only the chat-control tokens are special
    assert modality_labels(ids, REAL, media=()).tolist() == \
        ["special"] + ["text"] * 13 + ["special"]
    assert modality_runs(np.array(want[:5], dtype=object)).tolist() == [0, 0, 0, 0, 1]
    with pytest.raises(InputError, match="unknown media"):
        modality_labels(ids, REAL, media={"smell"})


def test_ids_from_configs():
    mini = ModalityTokens.from_path(ROOT / "data" / "mini")
    assert (mini.audio_token_id, mini.image_token_id, mini.video_token_id) == (4086, 4087, 4088)
    assert (mini.audio_start_token_id, mini.vision_start_token_id, mini.im_start_token_id) == (4089, 4090, 4094)
    assert mini.audio_end_token_id is None and mini.vision_end_token_id is None   # not in that config: not guessed
    thinker = ModalityTokens.from_config({"audio_token_id": 7, "vision_end_token_id": 9})
    assert thinker.ids() == {"audio_token_id": 7, "vision_end_token_id": 9}
    with pytest.raises(InputError, match="image_token_id"):
        ModalityTokens.from_config({"thinker_config": {"image_token_id": "5"}})


# -- the record column --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return q3lab.load(synth(tmp_path_factory.mktemp("tiny") / "ckpt", preset="tiny", seed=1))


def test_record_frame_has_modality_and_text_inputs_stay_text(tiny, tmp_path):
    toks = ModalityTokens.from_config(tiny.source.raw_config)
    assert toks.audio_token_id is not None
    im = 5 if toks.im_start_token_id is None else toks.im_start_token_id
    tiny.modality_tokens = ModalityTokens(**{**toks.ids(), "im_start_token_id": im})
    try:
        # a placeholder id in a text-only call is embedded as text, so it is labelled text
        ids = torch.tensor([[im, 11, toks.audio_token_id, toks.image_token_id, 12]])
        with record(tiny) as rec:
            tiny(ids)
        f = rec.to_frame()
    finally:
        del tiny.modality_tokens
    L, A = f.attrs["num_layers"], f.attrs["top_k"]
    assert list(f.columns) == ["prompt", "token_index", "position", "token", "layer", "rank", "expert", "weight",
                               "call", "modality"]
    per_token = f["modality"].to_numpy()[::L * A].tolist()
    assert per_token == ["special", "text", "text", "text", "text"]
    for suffix in (".parquet", ".csv"):
        g = load_trace(save_trace(f, tmp_path / f"t{suffix}"))
        pd.testing.assert_frame_equal(g, f, check_dtype=True)


# -- splits against a hand computation ----------------------------------------------------------------
# 5 tokens of one prompt, 2 layers, E = 4, top-2: experts per token and layer, and the token's modality
HAND = [("text", [0, 1], [2, 3]), ("text", [0, 1], [2, 3]), ("image", [2, 3], [0, 1]), ("image", [3, 2], [0, 2]),
        ("special", [0, 3], [1, 2])]


def _hand_frame() -> pd.DataFrame:
    rows = [dict(prompt=0, token_index=t, layer=layer, rank=r, expert=e, weight=0.5, modality=mod)
            for t, (mod, *layers) in enumerate(HAND) for layer, ex in enumerate(layers) for r, e in enumerate(ex)]
    f = pd.DataFrame(rows).astype({"layer": np.int16, "rank": np.int16, "expert": np.int16})
    f.attrs.update(num_experts=4, top_k=2, num_layers=2)
    return f


def test_modality_load_entropy_overlap_by_hand():
    load = M.modality_load(_hand_frame())
    share = load.set_index(["modality", "layer", "expert"])["share"].sort_index()
    assert share.loc["text", 0].tolist() == [1, 1, 0, 0]
    assert share.loc["image", 1].tolist() == [1, 0.5, 0.5, 0]
    assert share.loc["special", 0].tolist() == [1, 0, 0, 1]
    lift = load.set_index(["modality", "layer", "expert"])["lift"].sort_index()
    assert lift.loc[("text", 0, 0)] == pytest.approx(1 / (3 / 5))          # e0 of layer 0: 3 of 5 tokens
    assert set(load.groupby("modality")["tokens"].first().items()) == {("text", 2), ("image", 2), ("special", 1)}
    ent = M.modality_entropy(load).set_index(["modality", "layer"])
    assert ent.loc[("text", 0), "entropy_bits"] == pytest.approx(1.0)
    assert ent.loc[("image", 1), "entropy_bits"] == pytest.approx(1.5)       # p = 1/2, 1/4, 1/4
    assert ent.loc[("image", 1), "normalised_entropy"] == pytest.approx(0.75)
    assert ent.loc[("image", 1), "distinct_experts"] == 3
    ov = M.modality_overlap(load).set_index(["modality_a", "modality_b", "layer"])["overlap"]
    assert ov.loc[("text", "image", 0)] == pytest.approx(0.0)
    assert ov.loc[("text", "image", 1)] == pytest.approx(0.25)                # min(1/2, 1/4) at e2
    assert ov.loc[("image", "special", 0)] == pytest.approx(0.5)              # e3: min(1/2, 1/2)
    ex = M.modality_experts(load)
    got = list(zip(ex["modality"], ex["layer"].astype(int), ex["expert"].astype(int), ex["share"]))
    assert got == [("image", 0, 2, 1.0), ("image", 0, 3, 1.0), ("image", 1, 0, 1.0), ("image", 1, 1, 0.5),
                   ("text", 0, 0, 1.0), ("text", 0, 1, 1.0), ("text", 1, 3, 1.0)]
    assert np.isinf(ex["ratio"]).all()


def test_modality_hit_rate_by_hand():
    # LRU, one cache of 4 experts over both layers, decode order (token, layer, experts ascending):
    # t0 misses 4; t1 hits 4; t2 (image arrives) misses 4; t3 hits (0,2) (0,3) (1,0), misses (1,2);
    # t4 (special) misses (0,0), hits (0,3), misses (1,1), hits (1,2)
    f = _hand_frame()
    hr = M.modality_hit_rate(f, 4, "lru", arrival_tokens=1).set_index(["modality", "phase"])
    assert hr.loc[("text", "arrival"), "hits"] == 0 and hr.loc[("text", "within"), "hits"] == 4
    assert hr.loc[("image", "arrival"), "hit_rate"] == 0.0
    assert hr.loc[("image", "within"), "hit_rate"] == 0.75
    assert hr.loc[("image", "all"), "hit_rate"] == 3 / 8
    assert hr.loc[("special", "all"), "hit_rate"] == 0.5
    from q3lab.analysis.cachesim import simulate
    total = simulate(f, [4], policies=["lru"])["hits"].iloc[0]
    assert total == hr.xs("all", level="phase")["hits"].sum() == 9


# -- the atlas column ----------------------------------------------------------------------------------
def _write(folder: Path, fmt: str, modality: bool):
    L, A, E = 2, 2, 4
    ex = np.array([[*a, *b] for _, a, b in HAND])
    n = len(HAND)
    manifest = {"format": fmt, "config": {"num_layers": L, "top_k": A, "num_experts": E}, "parts": [
        {"name": part_name(0, 1), "first": 0, "end": 1, "tokens": n}]}
    w = DatasetWriter(folder, manifest)
    table = routing_table(["d0"] * n, np.arange(n), np.arange(n) + 10, [None] * n, ex,
                          np.full((n, L * A), 0.5), L, A, modality=[m for m, *_ in HAND])
    if not modality:   # what q3lab-atlas/1 wrote: no modality column
        table = table.drop(["modality"])
    w.write_part(part_name(0, 1), table)
    return open_dataset(folder)


def test_atlas_modality_round_trip_and_old_datasets(tmp_path):
    ds = _write(tmp_path / "new", "q3lab-atlas/2", True)
    assert pq.read_schema(ds.parts[0]).field("modality").type == pa.string()
    got = np.concatenate([b["modality"] for b in Q.stream(ds, ("token_index", "modality"))]).tolist()
    assert got == [m for m, *_ in HAND]
    pd.testing.assert_frame_equal(Q.modality_load(ds), M.modality_load(_hand_frame()))
    hr = Q.modality_hit_rate(ds, 4, "lru", arrival_tokens=1)
    pd.testing.assert_frame_equal(hr, M.modality_hit_rate(_hand_frame(), 4, "lru", arrival_tokens=1))
    s = Q.modality_summary(ds)
    assert set(s) == {"load", "entropy", "experts", "overlap"} and len(s["experts"]) == 7
    old = _write(tmp_path / "old", "q3lab-atlas/1", False)
    assert not old.has_modality
    assert np.concatenate([b["modality"] for b in Q.stream(old, ("modality",))]).tolist() == ["text"] * 5
    load = Q.modality_load(old)
    assert load["modality"].unique().tolist() == ["text"] and load["tokens"].iloc[0] == 5
    with pytest.raises(InputError, match="modality"):
        routing_table(["d"], np.arange(1), np.arange(1), [None], np.zeros((1, 4)), np.zeros((1, 4)), 2, 2,
                      modality=["smell"])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text(json.dumps({"format": "q3lab-atlas/9"}))
    with pytest.raises(InputError, match="q3lab-atlas/1"):
        open_dataset(bad)


# -- on the tiny random full Qwen3-Omni (towers) ---------------------------------------------------------------
@pytest.fixture(scope="module")
def omni(tmp_path_factory):
    pytest.importorskip("transformers")
    from q3lab.omni.synthetic import tiny_omni_checkpoint
    path = tiny_omni_checkpoint(tmp_path_factory.mktemp("omni") / "ckpt", seed=0)
    return path, q3lab.load(path, towers=True)


def test_record_labels_media_tokens_of_a_multimodal_call(omni):
    from q3lab.omni.inputs import OmniSpec, build_inputs
    from q3lab.omni.modality import read_media, record_media
    path, model = omni
    spec = OmniSpec.from_config(path)
    media = read_media(ROOT / "data" / "omni_inputs")
    assert [n for n, _ in media] == ["shapes.png", "tone.wav"]
    before, after = [10, 11, 12], [20, 21]
    rec = record_media(model, spec, media, before, after, max_new_tokens=2)
    f = rec.to_frame()
    L, A = f.attrs["num_layers"], f.attrs["top_k"]
    tokens = f.iloc[::L * A]
    for name, medium in media:
        ids = build_inputs(spec, [before, medium, after])["input_ids"][0].tolist()
        got = tokens[tokens["prompt"] == name]
        kind = "image" if name.endswith(".png") else "audio"
        pad = spec.image_token_id if kind == "image" else spec.audio_token_id
        want = ["special" if i in (spec.vision_start_token_id, spec.vision_end_token_id, spec.audio_start_token_id,
                                   spec.audio_end_token_id) else kind if i == pad else "text" for i in ids]
        assert got["modality"].tolist() == want + ["text"]    # the first greedy token, fed back in: text
        assert got["token"].tolist()[:len(ids)] == ids
        assert (got["domain"] == kind).all()
    assert (tokens[tokens["prompt"] == "text"]["modality"] == "text").all()
    # routing rows of the media tokens equal an unrecorded forward's router choice (hooks change nothing)
    ids = build_inputs(spec, [before, media[0][1], after])
    with record(model) as rec2:
        model(ids.pop("input_ids"), **ids)
    g = rec2.to_frame()
    img = f[(f["prompt"] == "shapes.png") & (f["token_index"] < len(g) // (L * A))]
    np.testing.assert_array_equal(g["expert"].to_numpy(), img["expert"].to_numpy())
    assert g["modality"].tolist() == img["modality"].tolist()


def test_runner_skips_tower_notebooks_without_towers(omni):
    from q3lab.viz import notebooks as nbk
    assert nbk.has_towers(omni[0]) and not nbk.has_towers(ROOT / "data" / "mini")
    nb = ROOT / "notebooks" / "08_multimodal_routing.py"
    skipped = nbk._tower_run(nb, {"checkpoint": str(ROOT / "data" / "mini")})
    assert skipped[0] is None and "no audio/vision tower tensors" in skipped[2]
    assert nbk._tower_run(nb, {"checkpoint": str(omni[0])})[0] == nb
    assert nbk._tower_run(nb, {})[0] == nb


def test_positions_of_a_real_layout_equal_transformers():
    pytest.importorskip("transformers")
    from q3lab.omni.modality import positions_check, read_media
    frame, summary = positions_check(read_media(ROOT / "data" / "omni_inputs"))
    assert summary["equal"].all() and (summary["max_abs_diff"] == 0).all()
    assert frame["modality"].value_counts().to_dict() == {"image": 12, "text": 8, "special": 7, "audio": 7}
    img = frame[frame["modality"] == "image"]
    # a 128x96 image: 6x8 patches of 16 px merged 2x2 -> a 3x4 grid at one temporal position
    assert img["t"].nunique() == 1 and img["h"].nunique() == 3 and img["w"].nunique() == 4
    aud = frame[frame["modality"] == "audio"]
    assert (aud["t"] == aud["h"]).all() and (np.diff(aud["t"]) == 1).all()


def test_read_media_resamples_and_refuses_bad_files(tmp_path):
    import soundfile
    from q3lab.omni.modality import read_media
    wav = np.sin(np.arange(800) / 5).astype(np.float32)
    soundfile.write(tmp_path / "a.wav", np.stack([wav, wav], 1), 8000, subtype="FLOAT")   # stereo, 8 kHz
    (tmp_path / "notes.txt").write_text("not a medium")
    (name, audio), = read_media(tmp_path)
    assert name == "a.wav" and audio.sampling_rate == 16000 and len(audio.wav) == 1600
    np.testing.assert_allclose(audio.wav[::2], wav, atol=1e-6)        # linear: every other sample is an original
    (tmp_path / "b.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(InputError, match="b.png: cannot read it as an image"):
        read_media(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no audio"):
        read_media(tmp_path / "empty")
