"""A checkpoint folder broken in one precise way: `q3lab audit` reports it (exit 1, or 2 when the folder cannot be
read at all), `q3lab extract` refuses (exit 2) without touching an existing store, `q3lab.load` raises
`CheckpointError`, every message names the file/tensor and what was expected vs found, and the checkpoint
itself is never modified."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import q3lab
from faultkit import (cli, copy_ckpt, edit_header, index, read_shard, repack_shard, shard_of, snapshot,
                      write_index, write_shard)
from q3lab.weights.checkpoint import Checkpoint
from q3lab.errors import CheckpointError

NORM = "thinker.model.layers.1.post_attention_layernorm.weight"   # the kind of tensor the earlier attempt faked
EXPERT = "thinker.model.layers.2.mlp.experts.3.up_proj.weight"    # [I, D] = [32, 64] in the tiny preset
ATTN = "thinker.model.layers.3.self_attn.q_proj.weight"


def _config(path: Path, fn) -> None:
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


# Each breaker damages a copy of the tiny checkpoint and returns the fragments every message must contain.
def missing_config(p):
    (p / "config.json").unlink()
    return [f"{p / 'config.json'}", "file not found"]


def config_without_text_config(p):
    _config(p, lambda c: c["thinker_config"].pop("text_config"))
    return ["config.json", "thinker_config has no text_config"]


def config_of_another_model(p):
    (p / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 4}))
    return ["config.json", "no thinker text config found", "expected thinker_config.text_config"]


def index_points_to_missing_shard(p):
    shard = shard_of(p, ATTN)
    (p / shard).unlink()
    return [f"shard {shard} is missing from {p}", "the index lists"]


def shard_truncated_mid_tensor(p):
    shard = shard_of(p, NORM)
    (n_header, data) = read_shard(p / shard)
    b, e = n_header[NORM]["data_offsets"]
    raw = (p / shard).read_bytes()
    header_end = len(raw) - len(data)
    (p / shard).write_bytes(raw[:header_end + b + (e - b) // 2])   # cut inside NORM's bytes
    return [shard, "truncated", NORM, f"needs bytes up to {header_end + e}", f"file has {header_end + b + (e - b) // 2}"]


def header_length_too_big(p):
    shard = shard_of(p, ATTN)
    raw = bytearray((p / shard).read_bytes())
    raw[:8] = (10**12).to_bytes(8, "little")
    (p / shard).write_bytes(bytes(raw))
    return [shard, "corrupt header", "header length 1000000000000 exceeds"]


def header_invalid_json(p):
    shard = shard_of(p, ATTN)
    raw = bytearray((p / shard).read_bytes())
    raw[8:10] = b"{]"
    (p / shard).write_bytes(bytes(raw))
    return [shard, "corrupt header: invalid JSON"]


def header_offsets_past_end(p):
    shard = shard_of(p, ATTN)
    size = (p / shard).stat().st_size

    def push(h):
        b, e = h[ATTN]["data_offsets"]
        h[ATTN]["data_offsets"] = [b + 10**6, e + 10**6]
    edit_header(p / shard, push)
    return [shard, "truncated", ATTN, "needs bytes up to"]


def tensor_missing_from_its_shard(p):
    shard = shard_of(p, NORM)
    repack_shard(p / shard, lambda entries: [e for e in entries if e[0] != NORM])  # the index still lists it
    return [NORM, f"index points to {shard}, which does not contain it"]


def renamed_tensor(p):
    new = NORM.replace("post_attention_layernorm", "post_attn_layernorm")
    shard = shard_of(p, NORM)
    repack_shard(p / shard, lambda entries: [[new if e[0] == NORM else e[0], *e[1:]] for e in entries])
    ix = index(p)
    ix["weight_map"][new] = ix["weight_map"].pop(NORM)
    write_index(p, ix)
    return [NORM, "not in the index"]


def wrong_shape(p):
    shard = shard_of(p, EXPERT)
    edit_header(p / shard, lambda h: h[EXPERT].__setitem__("shape", [64, 32]))   # same bytes, transposed shape
    return [EXPERT, shard, "found [64, 32], expected [32, 64]"]


def unexpected_dtype(p):
    shard = shard_of(p, EXPERT)
    edit_header(p / shard, lambda h: h[EXPERT].__setitem__("dtype", "F16"))   # same size: only the config tells
    return [EXPERT, shard, "found F16, expected BF16"]


def integer_dtype(p):
    shard = shard_of(p, EXPERT)
    edit_header(p / shard, lambda h: h[EXPERT].__setitem__("dtype", "I16"))
    return [EXPERT, shard, "found I16, expected BF16"]


def duplicate_key_across_shards(p):
    home = shard_of(p, EXPERT)
    other = next(s for s in sorted(set(index(p)["weight_map"].values())) if s != home)
    header, data = read_shard(p / home)
    b, e = header[EXPERT]["data_offsets"]
    repack_shard(p / other, lambda entries: entries + [[EXPERT, "BF16", [32, 64], data[b:e]]])
    first, second = sorted([home, other])
    return [f"duplicate tensor {EXPERT} in", first, second]


def duplicate_key_in_index(p):
    text = (p / "model.safetensors.index.json").read_text()
    entry = f'"{EXPERT}": "{shard_of(p, EXPERT)}"'
    (p / "model.safetensors.index.json").write_text(text.replace(entry, f"{entry},\n    {entry}", 1))
    return ["model.safetensors.index.json", f"duplicate key '{EXPERT}'"]


def duplicate_key_in_header(p):
    shard = shard_of(p, EXPERT)
    header, data = read_shard(p / shard)
    text = json.dumps(header)
    entry = f'"{EXPERT}": {json.dumps(header[EXPERT])}'
    write_shard(p / shard, text.replace(entry, f"{entry}, {entry}", 1), data)
    return [shard, "corrupt header: invalid JSON", f"duplicate key '{EXPERT}'"]


# (breaker, exit status of `q3lab audit`: 2 = the folder cannot be read as a checkpoint, 1 = the audit fails)
CASES = [
    (missing_config, 2), (config_without_text_config, 2), (config_of_another_model, 2),
    (index_points_to_missing_shard, 1), (shard_truncated_mid_tensor, 1), (header_length_too_big, 1),
    (header_invalid_json, 1), (header_offsets_past_end, 1), (tensor_missing_from_its_shard, 1),
    (renamed_tensor, 1), (wrong_shape, 1), (unexpected_dtype, 1), (integer_dtype, 1),
    (duplicate_key_across_shards, 1), (duplicate_key_in_index, 2), (duplicate_key_in_header, 1),
]


@pytest.fixture(scope="module")
def good_store(tiny_ckpt, tmp_path_factory) -> Path:
    from q3lab.weights.extraction import extract
    return extract(tiny_ckpt, tmp_path_factory.mktemp("good") / "store", progress=False)


def _has_all(text: str, fragments: list[str], what: str) -> None:
    for frag in fragments:
        assert frag in text, f"{what} does not name {frag!r}:\n{text}"


@pytest.mark.parametrize("breaker, audit_rc", CASES, ids=[c[0].__name__ for c in CASES])
def test_broken_checkpoint_is_named_and_refused_everywhere(breaker, audit_rc, tiny_ckpt, good_store, tmp_path,
                                                           capsys):
    path = copy_ckpt(tiny_ckpt, tmp_path / "ckpt")
    fragments = breaker(path)
    before = snapshot(path)

    rc, out, err = cli(capsys, "audit", path)
    assert rc == audit_rc
    if rc == 1:  # the report goes to stdout and ends with the verdict
        _has_all(out, fragments, "q3lab audit")
        assert out.rstrip().endswith("FAILED: the thinker text model is incomplete or inconsistent")
    else:        # one line on stderr
        assert err.startswith("q3lab audit: error: ") and not out
        _has_all(err, fragments, "q3lab audit")

    # extraction refuses, before creating anything and without touching a store already there
    fresh = tmp_path / "fresh"
    rc, out, err = cli(capsys, "extract", path, fresh, "--no-progress")
    assert rc == 2 and err.startswith("q3lab extract: error: ")
    _has_all(err, fragments, "q3lab extract")
    assert not fresh.exists()
    store = copy_ckpt(good_store, tmp_path / "store")
    kept = snapshot(store)
    rc, _, err = cli(capsys, "extract", path, store, "--no-progress")
    assert rc == 2 and snapshot(store) == kept

    with pytest.raises(CheckpointError) as e:
        q3lab.load(path)
    _has_all(str(e.value), fragments, "q3lab.load")

    assert snapshot(path) == before  # q3lab never writes into a checkpoint


def test_renamed_norm_is_never_replaced_by_a_default(tiny_ckpt, tmp_path):
    """The earlier attempt's failure: a norm it could not find was silently initialised. Here it is refused,
    unless the caller names it in allow_missing, and then the substitute is announced."""
    path = copy_ckpt(tiny_ckpt, tmp_path / "ckpt")
    renamed_tensor(path)
    name = NORM[len("thinker."):]
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        q3lab.load(path)
    with pytest.raises(CheckpointError, match="unexpected.*post_attn_layernorm"):
        q3lab.load(path, allow_missing=[name])  # the renamed copy is still an unexpected tensor
    with pytest.raises(CheckpointError, match=r"is missing: not in model\.safetensors\.index\.json"):
        Checkpoint(path).get(name)


def test_missing_norm_allowed_by_name_is_announced(tiny_ckpt, tmp_path):
    path = copy_ckpt(tiny_ckpt, tmp_path / "ckpt")
    ix = index(path)
    ix["weight_map"].pop(NORM)
    write_index(path, ix)
    name = NORM[len("thinker."):]
    with pytest.warns(UserWarning, match=r"layers\.1\.post_attention_layernorm\.weight is missing; substituted ones"):
        model = q3lab.load(path, allow_missing=[name])
    assert model.model.layers[1].post_attention_layernorm.weight.eq(1).all()
