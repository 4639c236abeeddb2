"""The thinker text model as a GGUF file of llama.cpp's `qwen3moe` architecture.

For text, the Qwen3-Omni thinker is a Qwen3-MoE: interleaved mRoPE with equal positions on its three axes is
1-D RoPE (docs/DESIGN.md, q3lab.analysis.rope_check). llama.cpp runs `qwen3moe` with NEOX rotary (rotate_half over split
halves, as transformers does), so q and k are written as they are: no row permutation (that is only for
llama.cpp's `llama` architecture, which rotates interleaved pairs).

Layout, in numpy (row-major) order; GGUF stores the reversed order as ggml's `ne`:
    token_embd [V, D]; output_norm [D]; output [V, D] (absent when tied)
    blk.N.attn_norm [D], attn_q [H*hd, D], attn_k / attn_v [KV*hd, D], attn_output [D, H*hd],
    attn_q_norm / attn_k_norm [hd], ffn_norm [D], ffn_gate_inp [E, D] (the router),
    ffn_gate_exps / ffn_up_exps [E, I, D], ffn_down_exps [E, D, I] (expert e at index e)

1-D tensors (norms) and the router are always written in float32, as llama.cpp's own converter does: ggml
multiplies activations by them in float32, and a bf16 or f16 source converts to float32 exactly.

`export_gguf` streams: each tensor is read from the weight source (a checkpoint folder or an extracted
store), converted and written before the next is read; a stacked expert tensor is written expert by expert.
The file appears under its name only when complete (temp file, fsync, rename).
"""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from q3lab.base.config import ThinkerConfig, expert_key
from q3lab.errors import CheckpointError, InputError
from q3lab.weights.store import fsync_dir, tmp_path
from q3lab.base.tokenizer import QWEN_SPLIT

ARCH = "qwen3moe"
# --dtype label -> (torch dtype of the written matrices, llama.cpp file type)
GGUF_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "f32": (torch.float32, 0),     # LlamaFileType.ALL_F32
    "f16": (torch.float16, 1),     # LlamaFileType.MOSTLY_F16
    "bf16": (torch.bfloat16, 32),  # LlamaFileType.MOSTLY_BF16
}
# torch dtype -> (GGML type name, numpy dtype of the same width for GGUFWriter.add_tensor_info)
_GGML = {torch.float32: ("F32", np.float32), torch.float16: ("F16", np.float16), torch.bfloat16: ("BF16", np.uint16)}
# GGUF's token types (gguf.TokenType)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def _gguf():
    try:
        import gguf
    except ImportError:
        raise InputError("q3lab export needs the gguf package: pip install 'q3lab[export]' (gguf==0.19.0)") from None
    return gguf


@dataclass
class GGUFTensor:
    """One tensor of the output: its GGUF name, numpy-order shape, torch dtype written, and a function
    yielding its data in order (whole, or one expert at a time for stacked expert tensors)."""
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: Callable[[], Iterator[tuple[str, torch.Tensor]]]   # (source name for errors, tensor)

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for s in self.shape:
            n *= s
        return n


def tensor_plan(source: Any, dtype: str = "bf16") -> list[GGUFTensor]:
    """The GGUF tensors of `source` (a `Checkpoint` or `Store`: `config`, `get(name)`), in file order."""
    if dtype not in GGUF_DTYPES:
        raise InputError(f"unknown GGUF dtype {dtype!r}: expected one of {', '.join(GGUF_DTYPES)}")
    cfg: ThinkerConfig = source.config
    mat = GGUF_DTYPES[dtype][0]
    f32 = torch.float32
    D, hd, E, I, V = cfg.hidden_size, cfg.head_dim, cfg.num_experts, cfg.moe_intermediate_size, cfg.vocab_size
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd

    def one(name: str) -> Callable[[], Iterator[tuple[str, torch.Tensor]]]:
        return lambda: iter([(name, source.get(name))])

    def stacked(layer: int, proj: str) -> Callable[[], Iterator[tuple[str, torch.Tensor]]]:
        # one expert at a time: the stacked tensor (400 MB in bf16 for the real model) is never held whole
        return lambda: ((expert_key(layer, e, proj), source.get(expert_key(layer, e, proj))) for e in range(E))

    plan = [GGUFTensor("token_embd.weight", (V, D), mat, one("model.embed_tokens.weight"))]
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        plan += [
            GGUFTensor(b + "attn_norm.weight", (D,), f32, one(p + "input_layernorm.weight")),
            GGUFTensor(b + "attn_q.weight", (q, D), mat, one(p + "self_attn.q_proj.weight")),
            GGUFTensor(b + "attn_k.weight", (kv, D), mat, one(p + "self_attn.k_proj.weight")),
            GGUFTensor(b + "attn_v.weight", (kv, D), mat, one(p + "self_attn.v_proj.weight")),
            GGUFTensor(b + "attn_output.weight", (D, q), mat, one(p + "self_attn.o_proj.weight")),
            GGUFTensor(b + "attn_q_norm.weight", (hd,), f32, one(p + "self_attn.q_norm.weight")),
            GGUFTensor(b + "attn_k_norm.weight", (hd,), f32, one(p + "self_attn.k_norm.weight")),
            GGUFTensor(b + "ffn_norm.weight", (D,), f32, one(p + "post_attention_layernorm.weight")),
            GGUFTensor(b + "ffn_gate_inp.weight", (E, D), f32, one(p + "mlp.gate.weight")),
            GGUFTensor(b + "ffn_gate_exps.weight", (E, I, D), mat, stacked(i, "gate")),
            GGUFTensor(b + "ffn_up_exps.weight", (E, I, D), mat, stacked(i, "up")),
            GGUFTensor(b + "ffn_down_exps.weight", (E, D, I), mat, stacked(i, "down")),
        ]
    plan.append(GGUFTensor("output_norm.weight", (D,), f32, one("model.norm.weight")))
    if not cfg.tie_word_embeddings:   # tied: llama.cpp reuses token_embd for the output
        plan.append(GGUFTensor("output.weight", (V, D), mat, one("lm_head.weight")))
    return plan


# -- the tokenizer ----------------------------------------------------------------------------------
@dataclass
class GGUFVocab:
    """A byte-level BPE vocabulary as GGUF stores it: every id 0..n-1 has a token string and a type."""
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    bos: int | None
    eos: int | None
    pad: int | None
    add_bos: bool
    chat_template: str | None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read tokenizer file: {e}") from None


def _pre_tokenizer_name(pre: Any, where: Path) -> str:
    """llama.cpp's name for the pre-tokenizer of tokenizer.json: only Qwen2's split + byte-level is known."""
    parts = pre.get("pretokenizers", [pre]) if isinstance(pre, dict) else []
    splits = [p.get("pattern", {}).get("Regex") for p in parts if isinstance(p, dict) and p.get("type") == "Split"]
    byte_level = any(isinstance(p, dict) and p.get("type") == "ByteLevel" for p in parts)
    if byte_level and splits == [QWEN_SPLIT]:
        return "qwen2"
    raise CheckpointError(f"{where}: pre-tokenizer is not Qwen2's split + ByteLevel (found splits {splits}, "
                          f"ByteLevel {byte_level}): llama.cpp would split text differently, so it is not exported")


def read_vocab(tokenizer_dir: str | Path, vocab_size: int) -> GGUFVocab:
    """The vocabulary of a Qwen-style byte-level BPE tokenizer folder (tokenizer.json, or vocab.json +
    merges.txt), padded with unused `[PAD{i}]` tokens up to `vocab_size` (the embedding rows)."""
    d = Path(tokenizer_dir)
    cfg_path = d / "tokenizer_config.json"
    tcfg = _read_json(cfg_path) if cfg_path.exists() else {}
    added: dict[int, tuple[str, bool]] = {}          # id -> (content, special)
    for k, v in (tcfg.get("added_tokens_decoder") or {}).items():
        added[int(k)] = (v["content"], bool(v.get("special", False)))
    if (d / "tokenizer.json").exists():
        tj = _read_json(d / "tokenizer.json")
        model = tj.get("model") or {}
        if model.get("type") != "BPE":
            raise CheckpointError(f"{d / 'tokenizer.json'}: model type {model.get('type')!r}, expected BPE")
        vocab = dict(model.get("vocab") or {})
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
        pre = _pre_tokenizer_name(tj.get("pre_tokenizer"), d / "tokenizer.json")
        for t in tj.get("added_tokens") or []:
            added[int(t["id"])] = (t["content"], bool(t.get("special", False)))
    elif (d / "vocab.json").exists() and (d / "merges.txt").exists():
        vocab = _read_json(d / "vocab.json")
        lines = (d / "merges.txt").read_text(encoding="utf-8").splitlines()
        merges = [ln for ln in lines if ln and not ln.startswith("#version")]
        pre = "qwen2"   # transformers' Qwen2Tokenizer applies Qwen2's split to vocab.json + merges.txt
    else:
        raise CheckpointError(f"{d}: no tokenizer (tokenizer.json, or vocab.json + merges.txt)")
    by_id: dict[int, tuple[str, int]] = {i: (tok, NORMAL) for tok, i in vocab.items()}
    for i, (content, special) in added.items():
        by_id[i] = (content, CONTROL if special else USER_DEFINED)
    top = max(by_id) + 1 if by_id else 0
    if top > vocab_size:
        raise CheckpointError(f"{d}: tokenizer has token id {top - 1}, but the embedding has only {vocab_size} rows")
    tokens, types = [], []
    for i in range(vocab_size):
        tok, kind = by_id.get(i, (f"[PAD{i}]", UNUSED))
        tokens.append(tok)
        types.append(kind)

    def tid(token: Any) -> int | None:
        if isinstance(token, dict):
            token = token.get("content")
        if not token:
            return None
        ids = [i for i, (t, _) in by_id.items() if t == token]
        if not ids:
            raise CheckpointError(f"{cfg_path}: special token {token!r} is not in the vocabulary")
        return ids[0]

    eos, pad = tid(tcfg.get("eos_token")), tid(tcfg.get("pad_token"))
    # Qwen has no BOS token; its published GGUFs name <|endoftext|> and never add it (add_bos_token false)
    bos = tid(tcfg.get("bos_token")) or tid("<|endoftext|>" if "<|endoftext|>" in vocab or any(
        c == "<|endoftext|>" for c, _ in added.values()) else None)
    template = tcfg.get("chat_template")
    if template is None and (d / "chat_template.json").exists():
        template = _read_json(d / "chat_template.json").get("chat_template")
    return GGUFVocab(tokens, types, merges, pre, bos, eos, pad, bool(tcfg.get("add_bos_token", False)),
                     template if isinstance(template, str) else None)


# -- writing ------------------------------------------------------------------------------------------
def _metadata(w, cfg: ThinkerConfig, vocab: GGUFVocab | None, dtype: str, name: str) -> None:
    gguf = _gguf()
    w.add_name(name)
    w.add_file_type(GGUF_DTYPES[dtype][1])
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    # No dense FFN: llama.cpp derives the expert width from this only when expert_feed_forward_length is absent
    w.add_feed_forward_length(cfg.moe_intermediate_size * cfg.num_experts_per_tok)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_expert_count(cfg.num_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_weights_norm(cfg.norm_topk_prob)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)
    w.add_vocab_size(cfg.vocab_size)
    if vocab is not None:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(vocab.pre)
        w.add_token_list(vocab.tokens)
        w.add_token_types(vocab.types)
        w.add_token_merges(vocab.merges)
        for fn, v in ((w.add_bos_token_id, vocab.bos), (w.add_eos_token_id, vocab.eos),
                      (w.add_pad_token_id, vocab.pad)):
            if v is not None:
                fn(v)
        w.add_add_bos_token(vocab.add_bos)
        if vocab.chat_template:
            w.add_chat_template(vocab.chat_template)


def _as_bytes(t: torch.Tensor, dtype: torch.dtype, what: str) -> np.ndarray:
    """`t` converted to `dtype`, as a numpy array of its bytes; f16 overflow is an error, never inf."""
    out = t.to(dtype).contiguous()
    if dtype == torch.float16 and not bool(torch.isfinite(out).all()) and bool(torch.isfinite(t).all()):
        big = float(t.float().abs().max())
        raise InputError(f"{what}: |value| up to {big:.4g} overflows float16 (max 65504): export as bf16 or f32")
    return out.view(-1).view(torch.uint8).numpy() if out.numel() else np.empty(0, np.uint8)


def export_gguf(checkpoint: str | Path | Any, out: str | Path, *, dtype: str = "bf16", progress: bool = True,
                tokenizer: bool = True) -> Path:
    """Write the thinker text model of `checkpoint` (a folder, store, or an open `Checkpoint`/`Store`) to
    `out` as a llama.cpp `qwen3moe` GGUF with matrices in `dtype` ("bf16", "f16" or "f32"); returns `out`.

    The tokenizer files of the folder are embedded (`tokenizer=False` leaves them out; a folder without them
    is a `CheckpointError` otherwise). llama.cpp's qwen3moe always renormalises the top-k router weights, so a
    config with norm_topk_prob false is refused rather than exported to a file that computes something else.
    """
    from q3lab.weights.source import open_weights
    gguf = _gguf()
    if dtype not in GGUF_DTYPES:
        raise InputError(f"unknown GGUF dtype {dtype!r}: expected one of {', '.join(GGUF_DTYPES)}")
    source = open_weights(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
    cfg: ThinkerConfig = source.config
    if not cfg.norm_topk_prob:
        raise CheckpointError(f"{source.path}: norm_topk_prob is false, but llama.cpp's qwen3moe always "
                              f"renormalises the top-{cfg.num_experts_per_tok} weights: not exported")
    vocab = None
    if tokenizer:
        if source.tokenizer_dir is None:
            raise CheckpointError(f"{source.path}: no tokenizer files (tokenizer.json or vocab.json + merges.txt);"
                                  f" export with tokenizer=False to leave the vocabulary out")
        vocab = read_vocab(source.tokenizer_dir, cfg.vocab_size)
    out = Path(out)
    if out.is_dir():
        raise InputError(f"{out}: is a directory, expected a file name such as model.gguf")
    plan = tensor_plan(source, dtype)
    tmp = tmp_path(out)
    w = gguf.GGUFWriter(tmp, ARCH)
    try:
        _metadata(w, cfg, vocab, dtype, Path(source.path).name)
        for t in plan:
            ggml, np_dtype = _GGML[t.dtype]
            w.add_tensor_info(t.name, t.shape, np_dtype, t.nbytes, raw_dtype=gguf.GGMLQuantizationType[ggml])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        f = w.fout[0]
        bar = tqdm(total=sum(t.nbytes for t in plan), unit="B", unit_scale=True, desc=f"export {out.name}",
                   disable=not progress)
        for t in plan:
            # GGUFWriter's own write_tensor_data takes a whole array: we write the same aligned layout in chunks
            w.write_padding(f, f.tell())
            written = 0
            per = t.shape[1:] if len(t.shape) == 3 else t.shape
            for what, chunk in t.chunks():
                if tuple(chunk.shape) != tuple(per):
                    raise CheckpointError(f"tensor {what}: shape {list(chunk.shape)}, expected {list(per)} "
                                          f"for {t.name}")
                data = _as_bytes(chunk, t.dtype, f"tensor {what}")
                data.tofile(f)
                written += data.nbytes
                bar.update(data.nbytes)
            if written != t.nbytes:   # a stacked tensor with a missing expert would shift every later one
                raise CheckpointError(f"{t.name}: wrote {written} bytes, expected {t.nbytes}")
            w.write_padding(f, written)
        bar.close()
        f.flush()
        os.fsync(f.fileno())
        w.close()
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except OSError as e:
        raise CheckpointError(f"{out}: cannot write: {e.strerror or e}") from None
    finally:
        w.close()
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return out

