"""Audit and lazy reading of checkpoints written by transformers itself (tests/hf_reference.py)."""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_reference import build_thinker_only, save_full
from q3lab.weights.checkpoint import Checkpoint, audit_checkpoint
from q3lab.cli import main
from q3lab.errors import CheckpointError

LAYERS, E, D, I, V, HQ, HKV, HD = 6, 8, 64, 32, 256, 4, 2, 16  # tiny_text_config defaults, 6 layers


def expected_count(layers: int) -> int:
    # embed + per layer (2 norms, q/k/v/o, q_norm, k_norm, router, 3 per expert) + final norm + lm_head
    return 1 + layers * (9 + 3 * E) + 2


def expected_numel(layers: int) -> int:
    per_layer = 2 * D + (HQ * HD) * D * 2 + (HKV * HD) * D * 2 + 2 * HD + E * D + E * 3 * I * D
    return 2 * V * D + D + layers * per_layer


@pytest.fixture(scope="session")
def hf_full(tmp_path_factory):
    """The official hub layout (`thinker.` prefix, talker, code2wav), 200 KB shards, fp32; and the model."""
    path = tmp_path_factory.mktemp("hf_full")
    model = save_full(path, seed=3, layers=LAYERS)
    return path, model


@pytest.fixture(scope="session")
def hf_thinker(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_thinker")
    model = build_thinker_only(seed=4, layers=2)
    model.save_pretrained(str(path), max_shard_size="200KB")
    return path, model


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def hf_param(model, name: str) -> torch.Tensor:
    """The transformers in-memory tensor behind a canonical non-expert name."""
    sd = model.thinker.state_dict() if hasattr(model, "thinker") else model.state_dict()
    return sd["lm_head.weight" if name == "lm_head.weight" else "model.language_model." + name[len("model."):]]


def test_complete_checkpoint_audits_clean(hf_full):
    path, model = hf_full
    report = audit_checkpoint(Checkpoint(path))
    assert report.ok, report.summary()
    assert report.errors == []
    assert len(report.frame) == expected_count(LAYERS) == 1 + 6 * 33 + 2
    text = report.components.set_index("component").loc["thinker_text"]
    assert int(text["tensors"]) == expected_count(LAYERS)
    # fp32 bytes of the text model: by hand, and by transformers' own parameter count
    hf_numel = sum(p.numel() for n, p in model.thinker.named_parameters()
                   if n.startswith("model.language_model.") or n == "lm_head.weight")
    assert int(text["bytes"]) == 4 * expected_numel(LAYERS) == 4 * hf_numel
    assert set(report.components["component"]) == {"thinker_text", "audio_tower", "visual", "talker", "code2wav"}
    assert report.straddling, "200 KB shards must split some layer across shards"
    assert "OK: the thinker text model is complete" in report.summary()


def test_thinker_only_checkpoint_audits_clean(hf_thinker):
    path, _ = hf_thinker
    ckpt = Checkpoint(path)
    assert ckpt.prefix == ""
    report = audit_checkpoint(ckpt)
    assert report.ok, report.summary()
    assert len(report.frame) == expected_count(2)


def test_reads_equal_transformers_weights(hf_full):
    path, model = hf_full
    ckpt = Checkpoint(path)
    sd = model.thinker.state_dict()
    for name in ckpt.names():
        if ".mlp.experts." not in name:
            assert torch.equal(ckpt.get(name), hf_param(model, name)), name
    for layer in range(LAYERS):
        gate_up = sd[f"model.language_model.layers.{layer}.mlp.experts.gate_up_proj"]  # [E, 2I, D], gate rows first
        down = sd[f"model.language_model.layers.{layer}.mlp.experts.down_proj"]        # [E, D, I]
        for e in range(E):
            g, u, d = ckpt.expert(layer, e)
            assert torch.equal(g, gate_up[e, :I]) and torch.equal(u, gate_up[e, I:]) and torch.equal(d, down[e])


def _drop_from_index(path: Path, key: str) -> str:
    idx = path / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    shard = data["weight_map"].pop(key)
    idx.write_text(json.dumps(data))
    return shard


def _drop_from_shard(path: Path, key: str) -> str:
    shard = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][key]
    tensors = load_file(str(path / shard))
    del tensors[key]
    save_file(tensors, str(path / shard), metadata={"format": "pt"})
    return shard


@pytest.mark.parametrize("name", ["model.layers.5.input_layernorm.weight", "model.layers.1.input_layernorm.weight",
                                  "model.layers.3.mlp.experts.6.down_proj.weight", "model.layers.0.mlp.gate.weight",
                                  "lm_head.weight", "model.embed_tokens.weight"])
@pytest.mark.parametrize("where", ["index", "shard"])
def test_one_missing_tensor_fails_the_audit_naming_it(hf_full, tmp_path, name, where):
    path = copy(hf_full[0], tmp_path / "ck")
    key = "thinker." + name
    shard = (_drop_from_index if where == "index" else _drop_from_shard)(path, key)
    report = audit_checkpoint(Checkpoint(path))
    assert not report.ok
    bad = report.problems()
    assert list(bad["key"]) == [key] and list(bad["status"]) == ["missing"]
    if where == "shard":
        assert shard in bad["detail"].iloc[0]  # the index still points there: the message says which shard
    assert key in report.summary() and "FAILED" in report.summary()
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        Checkpoint(path).get(name)


def test_cli_audit_exit_codes(hf_full, tmp_path, capsys):
    path = copy(hf_full[0], tmp_path / "ck")
    assert main(["audit", str(path)]) == 0
    assert "OK: the thinker text model is complete" in capsys.readouterr().out
    _drop_from_index(path, "thinker.model.layers.5.input_layernorm.weight")
    assert main(["audit", str(path)]) == 1
    assert "thinker.model.layers.5.input_layernorm.weight" in capsys.readouterr().out
    (path / "config.json").unlink()
    assert main(["audit", str(path)]) == 2
    assert "config.json" in capsys.readouterr().err


def _shard_of(path: Path, key: str) -> str:
    return json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][key]


def test_truncated_shard_is_a_clear_checkpoint_error(hf_full, tmp_path):
    path = copy(hf_full[0], tmp_path / "ck")
    shard = _shard_of(path, "thinker.model.layers.2.self_attn.q_proj.weight")
    data = (path / shard).read_bytes()
    (path / shard).write_bytes(data[:-100])
    report = audit_checkpoint(Checkpoint(path))
    assert not report.ok
    assert any(shard in e and "truncated" in e for e in report.errors), report.errors
    unreadable = report.frame[report.frame["status"] == "unreadable"]
    assert "thinker.model.layers.2.self_attn.q_proj.weight" in set(unreadable["key"])
    assert set(unreadable["shard"]) == {shard}
    with pytest.raises(CheckpointError, match=f"{shard}.*truncated"):
        Checkpoint(path).get("model.layers.2.self_attn.q_proj.weight")


@pytest.mark.parametrize("how", ["length", "json", "offsets"])
def test_corrupt_header_is_a_clear_checkpoint_error(hf_full, tmp_path, how):
    path = copy(hf_full[0], tmp_path / "ck")
    shard = _shard_of(path, "thinker.model.layers.4.mlp.gate.weight")
    data = bytearray((path / shard).read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    if how == "length":
        data[:8] = struct.pack("<Q", 10**12)
    elif how == "json":
        data[8:12] = b"\x00{]x"
    else:  # a tensor's data offsets run past the file's end
        header = json.loads(data[8:8 + n])
        key = "thinker.model.layers.4.mlp.gate.weight"
        b, e = header[key]["data_offsets"]
        header[key]["data_offsets"] = [b + 10**9, e + 10**9]
        raw = json.dumps(header).encode()
        data = bytearray(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    (path / shard).write_bytes(bytes(data))
    report = audit_checkpoint(Checkpoint(path))
    assert not report.ok and any(shard in e for e in report.errors), report.errors
    with pytest.raises(CheckpointError, match=shard):
        Checkpoint(path).get("model.layers.4.mlp.gate.weight")


def test_missing_shard_file(hf_full, tmp_path):
    path = copy(hf_full[0], tmp_path / "ck")
    shard = _shard_of(path, "thinker.lm_head.weight")
    (path / shard).unlink()
    report = audit_checkpoint(Checkpoint(path))
    assert not report.ok and any(shard in e and "missing" in e for e in report.errors)
    assert "thinker.lm_head.weight" in set(report.frame[report.frame["status"] == "unreadable"]["key"])


def test_dtype_and_shape_disagreeing_with_config(hf_full, tmp_path):
    path = copy(hf_full[0], tmp_path / "ck")
    key = "thinker.model.layers.1.self_attn.k_norm.weight"
    shard = _shard_of(path, key)
    tensors = load_file(str(path / shard))
    tensors[key] = tensors[key].half()  # config.json says float32
    save_file(tensors, str(path / shard), metadata={"format": "pt"})
    report = audit_checkpoint(Checkpoint(path))
    bad = report.problems()
    assert list(bad["key"]) == [key] and list(bad["status"]) == ["dtype"]
    assert "F16" in bad["detail"].iloc[0] and "F32" in bad["detail"].iloc[0]

    cfg = json.loads((path / "config.json").read_text())
    cfg["thinker_config"]["text_config"]["moe_intermediate_size"] = 16
    (path / "config.json").write_text(json.dumps(cfg))
    report = audit_checkpoint(Checkpoint(path))
    shape_rows = report.frame[report.frame["status"] == "shape"]
    assert len(shape_rows) == LAYERS * E * 3  # every expert matrix, and nothing else
    assert set(shape_rows["expert"]) == set(range(E))
