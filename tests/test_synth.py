"""q3lab.synth: synthetic checkpoints in the official layout, checked with q3lab's audit, the safetensors
library, and transformers' own loader."""
from __future__ import annotations

import filecmp
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from q3lab.weights.checkpoint import Checkpoint, audit_checkpoint
from q3lab.cli import main
from q3lab.base.config import ThinkerConfig
from q3lab.errors import InputError
from q3lab.weights.synthetic import preset_config, split_shards, synth, tensor_plan
from q3lab.base.tokenizer import load_tokenizer

INDEX = "model.safetensors.index.json"


def weight_map(path) -> dict[str, str]:
    return json.loads((path / INDEX).read_text())["weight_map"]


def read(path, key: str) -> torch.Tensor:
    with safe_open(str(path / weight_map(path)[key]), "pt") as f:
        return f.get_tensor(key)


def files(path) -> list[str]:
    """The checkpoint's files (synth's own marker, which records mtimes, left out)."""
    return sorted(p.name for p in path.iterdir() if p.name != ".q3lab-output.json")


def test_same_seed_same_bytes(tiny_ckpt, make_ckpt):
    again = make_ckpt("tiny", seed=0)
    assert files(again) == files(tiny_ckpt) == ["config.json", "model-00001-of-00003.safetensors",
                                                 "model-00002-of-00003.safetensors",
                                                 "model-00003-of-00003.safetensors", INDEX, "tokenizer.json",
                                                 "tokenizer_config.json"]
    match, mismatch, errors = filecmp.cmpfiles(tiny_ckpt, again, files(again), shallow=False)
    assert mismatch == [] and errors == []
    other = make_ckpt("tiny", seed=1)
    key = "thinker.model.layers.0.mlp.experts.0.gate_proj.weight"
    assert not torch.equal(read(other, key), read(tiny_ckpt, key))


def test_audits_clean_with_straddling_layers_and_stubs(tiny_ckpt):
    report = audit_checkpoint(Checkpoint(tiny_ckpt))
    assert report.ok, report.summary()
    assert len(report.frame) == 135  # embed + 4 layers x (9 + 8 experts x 3) + norm + lm_head
    assert report.straddling, "no layer straddles two shards"
    assert all(len(shards) == 2 for shards in report.straddling.values())
    comps = dict(zip(report.components["component"], report.components["tensors"]))
    assert comps == {"thinker_text": 135, "audio_tower": 6, "visual": 4, "talker": 15, "code2wav": 2}
    wm = weight_map(tiny_ckpt)
    assert "talker.model.layers.0.mlp.experts.3.down_proj.weight" in wm
    assert "thinker.audio_tower.conv2d1.weight" in wm and "code2wav.code_embedding.weight" in wm


def test_missing_tensor_fails_the_audit(tiny_ckpt, tmp_path):
    import shutil
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    key = "thinker.model.layers.1.input_layernorm.weight"
    shard = weight_map(ckpt)[key]
    tensors = load_file(str(ckpt / shard))
    del tensors[key]
    save_file(tensors, str(ckpt / shard), metadata={"format": "pt"})
    report = audit_checkpoint(Checkpoint(ckpt))
    assert not report.ok
    problems = report.problems()
    assert list(problems["key"]) == [key]
    assert list(problems["status"]) == ["missing"] and shard in problems["detail"].iloc[0]
    assert key in report.summary()


def test_values_are_random_normals_and_norms_near_one(make_ckpt):
    ckpt = make_ckpt("small", seed=3)
    w = read(ckpt, "thinker.model.layers.5.mlp.experts.7.down_proj.weight").float()  # 256 x 128 = 32768 values
    assert w.dtype == torch.float32 and abs(w.mean().item()) < 1e-3 and abs(w.std().item() - 0.02) < 1e-3
    for key in ["thinker.model.layers.2.input_layernorm.weight", "thinker.model.layers.2.self_attn.q_norm.weight",
                "thinker.model.norm.weight"]:
        n = read(ckpt, key).float()
        assert abs(n.mean().item() - 1) < 0.01 and 0.01 < n.std().item() < 0.03, key
        assert (n != 1).float().mean() > 0.5, f"{key}: norm weights must not be exactly 1"
    # independent draws: two experts of one layer are uncorrelated
    a = read(ckpt, "thinker.model.layers.0.mlp.experts.0.gate_proj.weight").float().flatten()
    b = read(ckpt, "thinker.model.layers.0.mlp.experts.1.gate_proj.weight").float().flatten()
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.05


def test_small_config_numbers(make_ckpt):
    ckpt = make_ckpt("small")
    raw = json.loads((ckpt / "config.json").read_text())
    assert raw["architectures"] == ["Qwen3OmniMoeForConditionalGeneration"]
    assert raw["model_type"] == "qwen3_omni_moe" and raw["torch_dtype"] == "bfloat16"
    text = raw["thinker_config"]["text_config"]
    assert text["torch_dtype"] == "bfloat16" and text["model_type"] == "qwen3_omni_moe_text"
    assert text["rope_scaling"]["mrope_section"] == [8, 4, 4] and text["rope_scaling"]["interleaved"] is True
    for part in ("audio_config", "vision_config"):
        assert part in raw["thinker_config"]
    for part in ("talker_config", "code2wav_config"):
        assert part in raw
    cfg = ThinkerConfig.from_file(ckpt)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_experts, cfg.num_experts_per_tok) == (256, 8, 16, 4)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (8, 2, 32)
    assert (cfg.mrope_section, cfg.moe_intermediate_size, cfg.vocab_size) == ([8, 4, 4], 128, 2048)
    assert cfg.norm_topk_prob and not cfg.tie_word_embeddings
    report = audit_checkpoint(Checkpoint(ckpt))
    assert report.ok and len(report.frame) == 1 + 8 * (9 + 16 * 3) + 2
    # the tokenizer fits the embedding table and the chat ids in config.json are the tokenizer's
    tok = load_tokenizer(ckpt)
    assert tok.vocab_size <= 2048
    assert raw["im_start_token_id"] == tok.special_tokens["<|im_start|>"]
    assert raw["im_end_token_id"] == tok.eos_token_id == tok.special_tokens["<|im_end|>"]
    assert tok.decode(tok.encode("Routing: 128 experts 🙂")) == "Routing: 128 experts 🙂"


def test_full_preset_plan_matches_the_real_model():
    # Not written (61 GB): its plan must have the real checkpoint's sizes (docs: 4,718,592 parameters per expert,
    # 29.0 B in experts, 1.54 B else; by hand: embed+lm_head 2*152064*2048, 48 x (attention 18,874,368 +
    # norms 4,352 + router 262,144), final norm 2,048).
    cfg = preset_config("full")
    plan = tensor_plan(cfg, stubs=False)
    experts = sum(t.numel for t in plan if ".mlp.experts." in t.key)
    assert cfg.expert_numel == 4_718_592 and experts == 4_718_592 * 128 * 48 == 28_991_029_248
    assert sum(t.numel for t in plan) - experts == 1_541_617_664
    assert len(split_shards(plan, 2)) == 15  # ceil(61.07 GB / 4 GiB), as many as the hub release has
    assert (cfg.rope_theta, cfg.max_position_embeddings, cfg.mrope_section) == (1e6, 65536, [24, 20, 20])


def test_expert_matrices_are_consecutive_and_shards_explicit(make_ckpt):
    plan = [t.key for t in tensor_plan(preset_config("tiny"))]
    i = plan.index("thinker.model.layers.3.mlp.experts.5.gate_proj.weight")
    assert plan[i + 1:i + 3] == ["thinker.model.layers.3.mlp.experts.5.up_proj.weight",
                                 "thinker.model.layers.3.mlp.experts.5.down_proj.weight"]
    ckpt = make_ckpt("tiny", shards=7, layers=2, dtype="fp32", stubs=False)
    assert sorted(set(weight_map(ckpt).values())) == [f"model-{k:05d}-of-00007.safetensors" for k in range(1, 8)]
    assert not any(k.startswith(("talker.", "code2wav.", "thinker.visual", "thinker.audio")) for k in weight_map(ckpt))
    assert read(ckpt, "thinker.lm_head.weight").dtype == torch.float32
    report = audit_checkpoint(Checkpoint(ckpt))
    assert report.ok and report.frame["dtype"].eq("F32").all()
    # 135 thinker text tensors + 27 stubs
    with pytest.raises(InputError, match="cannot cut 162 tensors into 10000 non-empty shards"):
        synth(ckpt.parent / "x", "tiny", shards=10000, progress=False)
    with pytest.raises(InputError, match="unknown synth preset 'huge'"):
        synth(ckpt.parent / "x", "huge", progress=False)
    with pytest.raises(InputError, match="unknown dtype 'int8'"):
        synth(ckpt.parent / "x", "tiny", dtype="int8", progress=False)


def test_interrupted_run_resumes_to_the_same_bytes(tiny_ckpt, make_ckpt, tmp_path, monkeypatch):
    import importlib
    synth_mod = importlib.import_module("q3lab.weights.synthetic")
    ckpt = make_ckpt("tiny", seed=0)
    (ckpt / "model-00002-of-00003.safetensors").unlink()
    real, calls = synth_mod.make_tensor, [0]

    def crash(*a, **k):   # an interruption in the middle of the last shard
        calls[0] += 1
        if calls[0] == 60:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(synth_mod, "make_tensor", crash)
    with pytest.raises(KeyboardInterrupt):
        synth(ckpt, "tiny", seed=0, progress=False)
    monkeypatch.undo()
    assert not (ckpt / INDEX).exists() and not list(ckpt.glob("*.tmp"))
    synth(ckpt, "tiny", seed=0, progress=False)
    names = files(tiny_ckpt)
    assert files(ckpt) == names and filecmp.cmpfiles(tiny_ckpt, ckpt, names, shallow=False)[0] == names
    # shards of another checkpoint in the folder: refuse rather than leave a mixed folder
    (ckpt / "model-00001-of-00009.safetensors").write_bytes(b"x")
    with pytest.raises(InputError, match="holds shards of another checkpoint"):
        synth(ckpt, "tiny", progress=False)


def test_transformers_loads_it(tiny_ckpt):
    transformers = pytest.importorskip("transformers")
    model = transformers.Qwen3OmniMoeForConditionalGeneration.from_pretrained(str(tiny_ckpt), dtype=torch.bfloat16)
    text = model.thinker.model
    text = getattr(text, "language_model", text)
    assert text.config.num_experts == 8 and text.config.head_dim == 16
    assert torch.equal(text.layers[1].input_layernorm.weight, read(tiny_ckpt, "thinker.model.layers.1.input_layernorm.weight"))
    assert torch.equal(text.embed_tokens.weight, read(tiny_ckpt, "thinker.model.embed_tokens.weight"))
    # transformers fuses experts as gate_up_proj [E, 2I, D] (gate rows first) and down_proj [E, D, I]
    p = "thinker.model.layers.2.mlp.experts.3."
    assert torch.equal(text.layers[2].mlp.experts.gate_up_proj[3],
                       torch.cat([read(tiny_ckpt, p + "gate_proj.weight"), read(tiny_ckpt, p + "up_proj.weight")]))
    assert torch.equal(text.layers[2].mlp.experts.down_proj[3], read(tiny_ckpt, p + "down_proj.weight"))
    assert torch.equal(model.thinker.lm_head.weight, read(tiny_ckpt, "thinker.lm_head.weight"))


def test_checkpoint_reader_agrees_with_safetensors(tiny_ckpt):
    ckpt = Checkpoint(tiny_ckpt)
    for name in ["model.layers.2.self_attn.k_norm.weight", "model.layers.1.mlp.experts.6.down_proj.weight",
                 "model.norm.weight"]:
        assert torch.equal(ckpt.get(name), read(tiny_ckpt, "thinker." + name))
    g, u, d = ckpt.expert(3, 7)
    assert torch.equal(u, read(tiny_ckpt, "thinker.model.layers.3.mlp.experts.7.up_proj.weight"))


def test_cli(tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["synth", str(out), "--preset", "tiny", "--seed", "3", "--layers", "2", "--dtype", "fp16",
                 "--no-stubs"]) == 0
    assert "2 layers" in capsys.readouterr().out
    cfg = ThinkerConfig.from_file(out)
    assert cfg.num_hidden_layers == 2 and cfg.hidden_size == 64
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    assert not any(k.startswith("talker.") for k in weight_map(out))
    assert main(["audit", str(out)]) == 0
    assert main(["synth", str(tmp_path / "d"), "--preset", "tiny", "--layers", "0"]) == 2
    assert "layers must be at least 1" in capsys.readouterr().err
