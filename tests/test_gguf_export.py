"""q3lab export: the GGUF read back with gguf's own reader matches llama.cpp's qwen3moe layout and the source."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from q3lab.weights.checkpoint import Checkpoint  # noqa: E402
from q3lab.cli import main  # noqa: E402
from q3lab.base.config import expert_key  # noqa: E402
from q3lab.errors import CheckpointError, InputError  # noqa: E402
from q3lab.weights.extraction import extract  # noqa: E402
from q3lab.weights.gguf import export_gguf, read_vocab  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT / "data" / "mini"
GG = gguf.GGMLQuantizationType


def tensors(path: Path) -> dict[str, tuple[gguf.ReaderTensor, torch.Tensor]]:
    """name -> (reader entry, values as a torch tensor in numpy order: [rows, cols] / [E, rows, cols])."""
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        shape = tuple(int(s) for s in reversed(t.shape))
        data = np.ascontiguousarray(t.data)
        if t.tensor_type == GG.BF16:
            v = torch.from_numpy(data.view(np.uint8).copy()).view(torch.bfloat16).reshape(shape)
        else:
            v = torch.from_numpy(data.copy()).reshape(shape)
        out[t.name] = (t, v)
    return out


def fields(path: Path) -> dict:
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items()}


def source_name(gname: str) -> str | None:
    """The canonical q3lab tensor behind a GGUF name (None for stacked experts)."""
    top = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    if gname in top:
        return top[gname]
    _, i, part, _ = gname.split(".")
    per = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
           "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
           "attn_k_norm": "self_attn.k_norm", "ffn_norm": "post_attention_layernorm", "ffn_gate_inp": "mlp.gate"}
    return f"model.layers.{i}.{per[part]}.weight" if part in per else None


@pytest.fixture(scope="module")
def exported(tiny_ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    return {dt: export_gguf(tiny_ckpt, d / f"tiny-{dt}.gguf", dtype=dt, progress=False) for dt in ("bf16", "f16", "f32")}


def test_names_shapes_dtypes_follow_qwen3moe(tiny_ckpt, exported):
    cfg = Checkpoint(tiny_ckpt).config
    D, hd, E, I, V = cfg.hidden_size, cfg.head_dim, cfg.num_experts, cfg.moe_intermediate_size, cfg.vocab_size
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    # every name llama.cpp's qwen3moe lists (gguf's own table), for every layer, and nothing else
    arch = gguf.MODEL_ARCH.QWEN3MOE
    names = {gguf.TENSOR_NAMES[t].format(bid=i) + ".weight" for t in gguf.MODEL_TENSORS[arch]
             for i in range(cfg.num_hidden_layers)}
    ne = {"token_embd": (D, V), "output_norm": (D,), "output": (D, V), "attn_norm": (D,), "attn_q": (D, q),
          "attn_k": (D, kv), "attn_v": (D, kv), "attn_output": (q, D), "attn_q_norm": (hd,), "attn_k_norm": (hd,),
          "ffn_norm": (D,), "ffn_gate_inp": (D, E), "ffn_gate_exps": (D, I, E), "ffn_up_exps": (D, I, E),
          "ffn_down_exps": (I, D, E)}
    for dt, want in (("bf16", GG.BF16), ("f16", GG.F16), ("f32", GG.F32)):
        ts = tensors(exported[dt])
        assert set(ts) == names
        assert len(ts) == 3 + 12 * cfg.num_hidden_layers
        for name, (t, _) in ts.items():
            part = name.split(".")[-2]
            assert tuple(int(s) for s in t.shape) == ne[part], name        # ggml ne order: [cols, rows, E]
            one_d_or_router = len(ne[part]) == 1 or part == "ffn_gate_inp"
            assert t.tensor_type == (GG.F32 if one_d_or_router else want), (dt, name)
        assert fields(exported[dt])["general.file_type"] == {"bf16": 32, "f16": 1, "f32": 0}[dt]


def test_values_equal_the_source_and_experts_stack_in_order(tiny_ckpt, exported):
    ck = Checkpoint(tiny_ckpt)
    E = ck.config.num_experts
    for dt in ("bf16", "f32", "f16"):
        for name, (t, v) in tensors(exported[dt]).items():
            src = source_name(name)
            if src is None:        # blk.N.ffn_{gate,up,down}_exps: [E, ...], expert e at index e
                layer, proj = int(name.split(".")[1]), name.split(".")[2].split("_")[1]
                src_t = torch.stack([ck.get(expert_key(layer, e, proj)) for e in range(E)])
            else:
                src_t = ck.get(src)
            assert src_t.dtype == torch.bfloat16 and v.shape == src_t.shape, name
            if dt == "f16" and v.dtype == torch.float16:
                # bf16 -> f16: exact for normal f16 values; f16 subnormals (< 6.1e-5) round to steps of 2**-24
                torch.testing.assert_close(v.float(), src_t.float(), rtol=2**-11, atol=2**-24)
            else:          # bf16 and f32 (and the f32 norms/router of every export) are exact
                assert torch.equal(v.float(), src_t.float()), (dt, name)
    # the stacking is not an accident of equal experts: distinct experts, and index e holds expert e
    _, v = tensors(exported["bf16"])["blk.1.ffn_down_exps.weight"]
    assert torch.equal(v[3], ck.get(expert_key(1, 3, "down"))) and not torch.equal(v[3], v[4])


def test_metadata(tiny_ckpt, exported):
    cfg = Checkpoint(tiny_ckpt).config
    f = fields(exported["bf16"])
    a = "qwen3moe."
    assert f["general.architecture"] == "qwen3moe"
    want = {a + "block_count": cfg.num_hidden_layers, a + "context_length": cfg.max_position_embeddings,
            a + "embedding_length": cfg.hidden_size, a + "attention.head_count": cfg.num_attention_heads,
            a + "attention.head_count_kv": cfg.num_key_value_heads, a + "attention.key_length": cfg.head_dim,
            a + "attention.value_length": cfg.head_dim, a + "expert_count": cfg.num_experts,
            a + "expert_used_count": cfg.num_experts_per_tok,
            a + "expert_feed_forward_length": cfg.moe_intermediate_size, a + "expert_weights_norm": True,
            a + "vocab_size": cfg.vocab_size}
    assert {k: f[k] for k in want} == want
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_experts) == (64, 4, 8)   # the tiny preset
    assert f[a + "rope.freq_base"] == pytest.approx(cfg.rope_theta)
    assert f[a + "attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps, rel=1e-6)
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "qwen2"


def test_mini_tokenizer_round_trip(tmp_path):
    out = export_gguf(MINI, tmp_path / "mini.gguf", dtype="bf16", progress=False)
    f = fields(out)
    tj = json.loads((MINI / "tokenizer.json").read_text())
    vocab = {i: t for t, i in tj["model"]["vocab"].items()}
    specials = {t["id"]: t["content"] for t in tj["added_tokens"]}
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 4096                       # = embedding rows of data/mini
    assert tokens == [vocab.get(i, specials.get(i)) for i in range(4096)]
    assert types == [3 if i in specials else 1 for i in range(4096)]   # CONTROL for specials, NORMAL else
    assert f["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    assert (f["tokenizer.ggml.eos_token_id"], f["tokenizer.ggml.padding_token_id"]) == (4095, 4093)  # im_end, eot
    assert f["tokenizer.ggml.bos_token_id"] == 4093 and f["tokenizer.ggml.add_bos_token"] is False


def test_vocab_json_layout_pads_and_user_defined(tmp_path):
    """vocab.json + merges.txt (the hub's other layout): ids past the vocabulary become UNUSED [PADi]
    (the real model has 152064 rows for ~151.7k tokens) and non-special added tokens USER_DEFINED."""
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "ab": 2}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": {"3": {"content": "<|endoftext|>", "special": True},
                                 "4": {"content": "<think>", "special": False}},
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "bos_token": None}))
    v = read_vocab(tmp_path, 7)
    assert v.tokens == ["a", "b", "ab", "<|endoftext|>", "<think>", "[PAD5]", "[PAD6]"]
    assert v.types == [1, 1, 1, 3, 4, 5, 5]
    assert v.merges == ["a b"] and v.pre == "qwen2" and (v.bos, v.eos, v.pad) == (3, 3, 3)
    with pytest.raises(CheckpointError, match="token id 4, but the embedding has only 4 rows"):
        read_vocab(tmp_path, 4)


def test_store_exports_the_same_tensors(tiny_ckpt, exported, tmp_path):
    store = extract(tiny_ckpt, tmp_path / "store", progress=False)
    out = export_gguf(store, tmp_path / "from-store.gguf", dtype="bf16", progress=False)
    a, b = tensors(exported["bf16"]), tensors(out)
    assert list(a) == list(b)
    assert all(torch.equal(a[k][1], b[k][1]) for k in a)


def test_cli_and_refusals(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert main(["export", str(tiny_ckpt), str(out), "--dtype", "f32", "--no-progress"]) == 0
    assert "qwen3moe, f32" in capsys.readouterr().out and out.exists()
    # llama.cpp's qwen3moe always renormalises the top-k weights: a config saying otherwise is refused
    bad = tmp_path / "no-norm"
    shutil.copytree(tiny_ckpt, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["thinker_config"]["text_config"]["norm_topk_prob"] = False
    (bad / "config.json").write_text(json.dumps(cfg))
    assert main(["export", str(bad), str(tmp_path / "x.gguf")]) == 2
    assert "norm_topk_prob is false" in capsys.readouterr().err
    with pytest.raises(InputError, match="unknown GGUF dtype 'q8'"):
        export_gguf(tiny_ckpt, tmp_path / "y.gguf", dtype="q8")


class _FailsLate:
    """A weight source whose final norm cannot be read: the export must fail after writing most tensors."""

    def __init__(self, ck: Checkpoint):
        self.ck, self.config, self.path, self.tokenizer_dir = ck, ck.config, ck.path, ck.tokenizer_dir

    def get(self, name: str) -> torch.Tensor:
        if name == "model.norm.weight":
            raise CheckpointError("tensor model.norm.weight: injected read failure")
        return self.ck.get(name)


def test_atomic_failure_keeps_the_old_file(tiny_ckpt, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old contents")
    with pytest.raises(CheckpointError, match="injected"):
        export_gguf(_FailsLate(Checkpoint(tiny_ckpt)), out, progress=False)
    assert out.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]       # no temp file left behind


def test_f16_overflow_is_an_error(make_ckpt, tmp_path):
    path = make_ckpt("tiny", dtype="fp32", layers=1)
    ck = Checkpoint(path)

    class Big(_FailsLate):
        def get(self, name):
            t = self.ck.get(name)
            return t * 1e6 if name.endswith("q_proj.weight") else t
    with pytest.raises(InputError, match="q_proj.weight.*overflows float16"):
        export_gguf(Big(ck), tmp_path / "f16.gguf", dtype="f16", progress=False)


def test_f32_source_to_f16_rounds_and_to_f32_is_exact(make_ckpt, tmp_path):
    ck = Checkpoint(make_ckpt("tiny", dtype="fp32", layers=1))
    f16 = tensors(export_gguf(ck, tmp_path / "a.gguf", dtype="f16", progress=False))
    f32 = tensors(export_gguf(ck, tmp_path / "b.gguf", dtype="f32", progress=False))
    src = ck.get("model.layers.0.self_attn.q_proj.weight")
    v16, v32 = f16["blk.0.attn_q.weight"][1], f32["blk.0.attn_q.weight"][1]
    assert torch.equal(v32, src)
    assert torch.equal(v16, src.to(torch.float16))            # round to nearest, as torch rounds
    assert not torch.equal(v16.float(), src)                   # fp32 values really were rounded
    torch.testing.assert_close(v16.float(), src, rtol=2**-11, atol=2**-24)
