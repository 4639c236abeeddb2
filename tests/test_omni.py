"""Multimodal input through q3lab's thinker against transformers' Qwen3-Omni thinker (issue 22, parts 1-3).

The oracle: a tiny random FULL Qwen3-Omni model (towers included) built with transformers and saved with
save_pretrained (`q3lab.omni.synthetic.tiny_omni_checkpoint`), loaded back by transformers' own
`from_pretrained` and by `q3lab.load(path, towers=True)`.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import q3lab  # noqa: E402
from q3lab.errors import CheckpointError, InputError  # noqa: E402
from q3lab.omni.inputs import Audio, Image, OmniSpec, Video, build_inputs, interleave_audio_video  # noqa: E402
from q3lab.omni.positions import rope_index  # noqa: E402
from q3lab.omni.synthetic import tiny_omni_checkpoint  # noqa: E402


def _cases() -> dict[str, list]:
    rs = np.random.RandomState(0)

    def frames(t, h, w):
        return (rs.rand(t, h, w, 3) * 255).astype(np.uint8)
    wav = Audio((rs.randn(24000) * 0.1).astype(np.float32))            # 1.5 s: 150 mel frames, 20 tokens
    return {
        "audio": [[1, 2, 3], wav, [4, 5]],
        "image": [[1, 2], Image(frames(1, 24, 16)[0]), [7, 8, 9]],
        "video": [[1], Video(frames(4, 16, 16), fps=2.0), [3, 4]],
        # 5 frames at 3 fps: padded to 6, fractional temporal positions (2/3 s per grid * 13)
        "video_fractional": [[1], Video(frames(5, 16, 24), fps=3.0), [3]],
        "audio_in_video": [[1], Video(frames(4, 16, 16), fps=2.0,
                                      audio=Audio((rs.randn(16000) * 0.1).astype(np.float32))), [5]],
        "mixed": [[1], Image(frames(1, 16, 16)[0]), [2], wav, [3], Video(frames(4, 16, 16), fps=2.0), [4]],
    }


CASES = _cases()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_omni_checkpoint(tmp_path_factory.mktemp("omni") / "tiny", seed=0)


@pytest.fixture(scope="module")
def hf(ckpt):
    from transformers import Qwen3OmniMoeForConditionalGeneration
    full = Qwen3OmniMoeForConditionalGeneration.from_pretrained(str(ckpt), dtype=torch.float32)
    return full.thinker.eval()


@pytest.fixture(scope="module")
def ours(ckpt):
    return q3lab.load(ckpt, towers=True)


@pytest.fixture(scope="module")
def spec(ckpt):
    return OmniSpec.from_config(ckpt)


def _mm(inp: dict) -> dict:
    return {k: v for k, v in inp.items() if k != "input_ids"}


def test_checkpoint_is_deterministic_full_layout(ckpt, tmp_path):
    again = tiny_omni_checkpoint(tmp_path / "again", seed=0)
    idx = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    assert {k.split(".")[1] for k in idx} == {"audio_tower", "visual", "model", "lm_head"}
    assert all(k.startswith("thinker.") for k in idx)
    for f in sorted(p.name for p in ckpt.glob("*.safetensors")):
        assert (ckpt / f).read_bytes() == (again / f).read_bytes(), f


def test_placeholder_counts(spec):
    """Pad runs as the processor writes them: audio = the tower's output length, image/video = t*h*w/4."""
    inp = build_inputs(spec, CASES["mixed"])
    ids = inp["input_ids"][0].tolist()
    assert ids.count(spec.image_token_id) == 1 * 4 * 4 // 4
    assert ids.count(spec.video_token_id) == 2 * 4 * 4 // 4
    # 150 frames: one full 100-frame chunk (13 tokens) + 50 frames through three stride-2 convs (25, 13, 7)
    assert ids.count(spec.audio_token_id) == 13 + 7
    assert inp["video_second_per_grid"].tolist() == [1.0]
    # audio in video: grid 0 (t=0) first, the 13 audio tokens of its second (positions 0..12), grid 1 at t=13
    order = interleave_audio_video([2, 4, 4], 13, 1.0, spec)
    assert "".join(order) == "v" * 4 + "a" * 13 + "v" * 4


def test_image_patches_match_processor_layout(spec):
    """The video patchify is the image processor's layout (an image = a 2-frame video of one repeated frame)."""
    from q3lab.omni.inputs import image_features, video_features
    img = (np.random.RandomState(3).rand(16, 24, 3) * 255).astype(np.uint8)
    a = image_features([Image(img)], spec)
    b = video_features([Video(img[None], fps=2.0)], spec)
    assert a["image_grid_thw"].tolist() == b["video_grid_thw"].tolist() == [[1, 4, 6]]
    torch.testing.assert_close(a["pixel_values"], b["pixel_values_videos"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", sorted(CASES))
def test_positions_equal_transformers(hf, spec, case):
    inp = build_inputs(spec, CASES[case])
    fam = inp.get("feature_attention_mask")
    kw = dict(image_grid_thw=inp.get("image_grid_thw"), video_grid_thw=inp.get("video_grid_thw"),
              attention_mask=inp["attention_mask"], use_audio_in_video=inp.get("use_audio_in_video", False),
              audio_seqlens=None if fam is None else fam.sum(-1), second_per_grids=inp.get("video_second_per_grid"))
    theirs, their_delta = hf.get_rope_index(inp["input_ids"], **kw)
    mine, my_delta = rope_index(inp["input_ids"], spec, **kw)
    assert torch.equal(mine, theirs)
    assert torch.equal(my_delta.float(), their_delta.float())
    if case in ("video", "video_fractional", "audio_in_video", "image"):
        assert not torch.equal(mine[0], mine[1]) or not torch.equal(mine[1], mine[2])   # unequal axes


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_routing_equal_transformers(hf, ours, spec, case):
    inp = build_inputs(spec, CASES[case])
    with torch.no_grad():
        out = hf(**inp, output_router_logits=True)
    with q3lab.record(ours) as rec:
        logits = ours(**inp)
    assert (logits - out.logits.float()).abs().max().item() < 1e-4
    frame = rec.to_frame()
    k = ours.config.num_experts_per_tok
    for layer, router in enumerate(out.router_logits):
        theirs = torch.topk(router.float(), k, dim=-1).indices              # [T, k] rank order
        mine = frame[frame.layer == layer].sort_values(["token_index", "rank"])["expert"].to_numpy()
        assert mine.reshape(-1, k).tolist() == theirs.tolist(), f"layer {layer}"


@pytest.mark.parametrize("case", ["image", "video_fractional", "audio_in_video", "mixed"])
def test_greedy_and_decode_logits_equal_transformers(hf, ours, spec, case):
    """Greedy continuations equal, and every decode step's logits (positions = text + rope deltas)."""
    inp = build_inputs(spec, CASES[case])
    n = 4
    g = hf.generate(**inp, max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None,
                    output_logits=True, return_dict_in_generate=True)
    mine = ours.generate(inp["input_ids"], n, **_mm(inp))
    assert mine.tolist() == g.sequences.tolist()
    # the same tokens fed one at a time through q3lab's KV cache
    T = inp["input_ids"].shape[1]
    cache = ours.new_cache(1, T + n)
    steps = [ours(inp["input_ids"], cache=cache, last_only=True,
                  **{k: v for k, v in _mm(inp).items() if k != "attention_mask"})[:, -1]]
    for t in range(n - 1):
        steps.append(ours(g.sequences[:, T + t:T + t + 1], cache=cache)[:, -1])
    for t, (a, b) in enumerate(zip(steps, g.logits)):
        assert (a - b.float()).abs().max().item() < 1e-4, f"step {t}"
    assert cache.rope_deltas is not None


def test_padded_batch_equal_transformers(hf, ours, spec):
    """Two prompts of different lengths, left-padded: positions count real tokens only."""
    a, b = build_inputs(spec, CASES["image"]), build_inputs(spec, [[9, 9, 9, 9]] + CASES["image"][1:])
    T = b["input_ids"].shape[1]
    pad = T - a["input_ids"].shape[1]
    ids = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), a["input_ids"]], 1), b["input_ids"]])
    mask = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), a["attention_mask"]], 1),
                      b["attention_mask"]])
    kw = dict(pixel_values=torch.cat([a["pixel_values"], b["pixel_values"]]),
              image_grid_thw=torch.cat([a["image_grid_thw"], b["image_grid_thw"]]), attention_mask=mask)
    with torch.no_grad():
        theirs = hf(input_ids=ids, **kw).logits
    mine = ours(ids, **kw)
    real = mask.bool()
    assert (mine[real] - theirs[real]).abs().max().item() < 1e-4
    g = hf.generate(input_ids=ids, **kw, max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert ours.generate(ids, 3, **kw).tolist() == g.tolist()


def test_expert_cache_serves_multimodal(ckpt, hf, spec):
    """The thinker's experts from an on-demand cache: the same logits as transformers."""
    small = q3lab.load(ckpt, towers=True, experts=q3lab.ExpertCache(capacity=4, per_layer=True))
    inp = build_inputs(spec, CASES["mixed"])
    with torch.no_grad():
        theirs = hf(**inp).logits
    assert (small(**inp) - theirs).abs().max().item() < 1e-4
    assert int(small.experts_provider.stats()["misses"].sum()) > 0


def test_missing_tower_tensor_is_named(ckpt, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    idx_path = broken / "model.safetensors.index.json"
    idx = json.loads(idx_path.read_text())
    gone = ["thinker.audio_tower.conv2d1.weight", "thinker.visual.merger_list.1.mlp.2.bias"]
    for k in gone:
        del idx["weight_map"][k]
    idx_path.write_text(json.dumps(idx))
    q3lab.load(broken)                      # the text model does not need them
    with pytest.raises(CheckpointError) as e:
        q3lab.load(broken, towers=True)
    for k in gone:
        assert k in str(e.value)


def test_missing_tower_shard_is_named(ckpt, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    idx = json.loads((broken / "model.safetensors.index.json").read_text())["weight_map"]
    shard = idx["thinker.visual.patch_embed.proj.weight"]
    text_shards = {v for k, v in idx.items() if not k.startswith(("thinker.visual.", "thinker.audio_tower."))}
    if shard in text_shards:
        pytest.skip("the tiny model's vision patch embedding shares a shard with text tensors")
    (broken / shard).unlink()
    with pytest.raises(CheckpointError, match=shard):
        q3lab.load(broken, towers=True)


def test_media_without_towers_is_refused(ckpt, spec):
    text_only = q3lab.load(ckpt)
    inp = build_inputs(spec, CASES["image"])
    with pytest.raises(InputError, match="towers=True"):
        text_only(**inp)


def test_wrong_placeholder_count_is_refused(ours, spec):
    inp = build_inputs(spec, CASES["image"])
    ids = inp["input_ids"].clone()
    ids[0, ids[0].tolist().index(spec.image_token_id)] = 5          # one image pad fewer
    with pytest.raises(InputError, match="placeholder"):
        ours(ids, **_mm(inp))


def test_text_path_does_not_import_transformers(ckpt):
    code = ("import sys, torch, q3lab; m = q3lab.load(sys.argv[1]); m(torch.tensor([[1, 2, 3]])); "
            "m.generate(torch.tensor([[1, 2]]), 2); "
            "assert 'transformers' not in sys.modules, 'transformers imported'")
    subprocess.run([sys.executable, "-c", code, str(ckpt)], check=True)


def test_extract_towers_verify_and_load(ckpt, hf, spec, tmp_path):
    """`q3lab extract --towers`: towers.safetensors checksummed in the manifest; the store loads with towers."""
    from q3lab.cli import main
    from q3lab.extract import verify
    store = tmp_path / "store"
    assert main(["extract", "--towers", str(ckpt), str(store), "--no-progress"]) == 0
    manifest = json.loads((store / "manifest.json").read_text())
    assert "towers.safetensors" in manifest["files"]
    towers = [t for t in manifest["tensors"] if t["file"] == "towers.safetensors"]
    assert {t["name"].split(".")[0] for t in towers} == {"audio_tower", "visual"}
    assert all(len(t["sha256"]) == 64 for t in towers)
    assert main(["extract", "--verify", str(store), "--no-progress"]) == 0
    inp = build_inputs(store, CASES["audio_in_video"])
    with torch.no_grad():
        theirs = hf(**inp).logits
    assert (q3lab.load(store, towers=True)(**inp) - theirs).abs().max().item() < 1e-4
    # one flipped byte in the towers file: verify names the file and the one tensor it falls in
    data = bytearray((store / "towers.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (store / "towers.safetensors").write_bytes(bytes(data))
    report = verify(store, progress=False, strict=False)
    assert not report.ok
    assert report.bad_files.get("towers.safetensors") == "sha256 differs from the manifest"
    assert list(report.bad_tensors.values()) == ["towers.safetensors"]


def test_store_without_towers_says_so(ckpt, tmp_path):
    from q3lab.extract import extract
    store = extract(ckpt, tmp_path / "text", progress=False)
    assert not (store / "towers.safetensors").exists()
    q3lab.load(store)
    with pytest.raises(CheckpointError, match="--towers") as e:
        q3lab.load(store, towers=True)
    assert "audio_tower.conv2d1.weight" in str(e.value)


def test_extract_towers_refuses_text_only_checkpoint(tmp_path):
    from q3lab.extract import extract
    text = q3lab.synth(tmp_path / "text", preset="tiny", seed=0, stubs=False, progress=False)
    with pytest.raises(CheckpointError, match="--towers"):
        extract(text, tmp_path / "out", progress=False, towers=True)


def test_real_layout_positions_and_mrope_24_20_20():
    """The real checkpoint's layout (token ids, 16-px patches, 128 mel bins, 13 positions per second): positions
    equal transformers' get_rope_index, and the interleaved [24, 20, 20] rotary of q3lab's step equals
    transformers' thinker rotary at those unequal positions."""
    import types
    from transformers import Qwen3OmniMoeTextConfig, Qwen3OmniMoeThinkerConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
        Qwen3OmniMoePreTrainedModelForConditionalGeneration as P, Qwen3OmniMoeThinkerTextRotaryEmbedding)
    from q3lab.model import mrope_freqs, rope_cos_sin, rope_inv_freq
    from q3lab.omni.inputs import DEFAULT_IDS
    spec = OmniSpec(**DEFAULT_IDS)                      # the real model's defaults
    rs = np.random.RandomState(1)
    parts = [[872, 11, 12], Image((rs.rand(224, 224, 3) * 255).astype(np.uint8)), [13],
             Audio((rs.randn(24000) * 0.1).astype(np.float32)), [14],
             Video((rs.rand(6, 64, 96, 3) * 255).astype(np.uint8), fps=2.0,
                   audio=Audio((rs.randn(48000) * 0.1).astype(np.float32))), [15, 16]]
    inp = build_inputs(spec, parts)
    ids = inp["input_ids"][0].tolist()
    assert ids.count(spec.image_token_id) == 49 and ids.count(spec.video_token_id) == 3 * 4 * 6 // 4
    cfg = Qwen3OmniMoeThinkerConfig(position_id_per_seconds=13, vision_start_token_id=spec.vision_start_token_id)
    fake = types.SimpleNamespace(config=cfg, spatial_merge_size=2)
    fake.get_llm_pos_ids_for_vision = types.MethodType(P.get_llm_pos_ids_for_vision, fake)
    kw = dict(image_grid_thw=inp["image_grid_thw"], video_grid_thw=inp["video_grid_thw"],
              attention_mask=inp["attention_mask"], use_audio_in_video=True,
              audio_seqlens=inp["feature_attention_mask"].sum(-1), second_per_grids=inp["video_second_per_grid"])
    theirs, their_delta = P.get_rope_index(fake, inp["input_ids"], **kw)
    mine, my_delta = rope_index(inp["input_ids"], spec, **kw)
    assert torch.equal(mine, theirs) and torch.equal(my_delta.float(), their_delta.float())
    assert (mine[1] != mine[0]).any() and (mine[2] != mine[1]).any()
    text = Qwen3OmniMoeTextConfig(hidden_size=2048, num_attention_heads=32, head_dim=128,   # the real thinker's
                                  rope_parameters={"rope_type": "default", "rope_theta": 1e6, "interleaved": True,
                                                   "mrope_section": [24, 20, 20], "mrope_interleaved": True})
    rot = Qwen3OmniMoeThinkerTextRotaryEmbedding(text)
    assert rot.mrope_section == [24, 20, 20]
    cos_t, sin_t = rot(torch.zeros(1, dtype=torch.float32), theirs)
    freqs = mrope_freqs(mine, rope_inv_freq(128, text.rope_parameters["rope_theta"]), [24, 20, 20], True)
    cos, sin_folded = rope_cos_sin(freqs, torch.float32)
    sin = torch.cat((-sin_folded[..., :64], sin_folded[..., 64:]), dim=-1)
    torch.testing.assert_close(cos, cos_t, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, sin_t, rtol=0, atol=1e-6)


def test_recorded_generate_equals_unrecorded(ours, spec):
    """q3lab.record around a multimodal generate: same tokens, routing for every fed token and layer."""
    inp = build_inputs(spec, CASES["audio_in_video"])
    plain = ours.generate(inp["input_ids"], 3, **_mm(inp))
    with q3lab.record(ours) as rec:
        recorded = ours.generate(inp["input_ids"], 3, **_mm(inp))
    assert recorded.tolist() == plain.tolist()
    frame = rec.to_frame()
    T = inp["input_ids"].shape[1]
    assert frame.groupby("layer")["token_index"].nunique().tolist() == [T + 2] * ours.config.num_hidden_layers


def test_generate_refuses_unknown_media_argument(ours, spec):
    inp = build_inputs(spec, CASES["image"])
    with pytest.raises(InputError, match="pixel_value"):
        ours.generate(inp["input_ids"], 2, pixel_value=inp["pixel_values"])


def test_reused_cache_forgets_media_offset(ours, spec):
    """A text prompt on a cache that held a multimodal one: plain text positions again."""
    inp = build_inputs(spec, CASES["video"])
    cache = ours.new_cache(1, 64)
    ours(inp["input_ids"], cache=cache, **{k: v for k, v in _mm(inp).items() if k != "attention_mask"})
    assert cache.rope_deltas is not None and float(cache.rope_deltas) != 0
    cache.length = 0
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(ours(ids, cache=cache), ours(ids), rtol=0, atol=0)
    assert cache.rope_deltas is None
