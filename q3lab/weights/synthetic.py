"""Synthetic Qwen3-Omni checkpoints: random weights in the exact official layout, so every tool can be tried
and tested without the real 66 GB download.

The folder holds what the hub release holds: a nested `config.json`, `model.safetensors.index.json`,
shards `model-0000K-of-0000N.safetensors` whose boundaries fall inside layers, per-expert keys under the
`thinker.` prefix, a tokenizer, and (with `stubs=True`) a few audio/vision/talker/code2wav tensors that an
extractor must leave out. Each tensor is drawn from a generator seeded by (seed, tensor name), and shards are
streamed to disk one tensor at a time, so `full` (about 61 GB) never needs more than one tensor in memory and
the same seed always gives the same bytes.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from q3lab.base.config import ThinkerConfig
from q3lab.errors import InputError
from q3lab.weights.outdir import OutputDir
from q3lab.base.safetensors_io import DTYPE_NAMES
from q3lab.base.tokenizer import check_vocab, save_tokenizer, train_bpe

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=4, num_experts=8, num_experts_per_tok=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, mrope_section=[4, 2, 2], moe_intermediate_size=32,
                 vocab_size=512, rope_theta=10000.0, max_position_embeddings=2048),
    "small": dict(hidden_size=256, num_hidden_layers=8, num_experts=16, num_experts_per_tok=4, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=32, mrope_section=[8, 4, 4], moe_intermediate_size=128,
                  vocab_size=2048, rope_theta=10000.0, max_position_embeddings=4096),
    "medium": dict(hidden_size=1024, num_hidden_layers=8, num_experts=64, num_experts_per_tok=8,
                   num_attention_heads=16, num_key_value_heads=4, head_dim=64, mrope_section=[16, 8, 8],
                   moe_intermediate_size=512, vocab_size=8192, rope_theta=1_000_000.0,
                   max_position_embeddings=32768),
    "full": dict(hidden_size=2048, num_hidden_layers=48, num_experts=128, num_experts_per_tok=8,
                 num_attention_heads=32, num_key_value_heads=4, head_dim=128, mrope_section=[24, 20, 20],
                 moe_intermediate_size=768, vocab_size=152064, rope_theta=1_000_000.0,
                 max_position_embeddings=65536),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_JSON = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
SHARD_TARGET = 4 * 2**30   # bytes per shard for big checkpoints (the hub's are ~4.4 GiB)
MIN_SHARDS = 3             # small checkpoints still get several shards, so layers straddle boundaries
TOKENIZER_VOCAB_CAP = 4096  # the built-in text cannot fill more; the embedding rows above are padding
GENERATOR = "q3lab.synth v1"  # goes into every shard's metadata: resuming never mixes two generators
STD = 0.02
INDEX = "model.safetensors.index.json"

# Enough varied text for a few hundred BPE merges; written for this file.
SAMPLE_TEXT = """\
A mixture-of-experts layer sends every token to a few of its experts. The router scores all of them,
keeps the best eight, and mixes their outputs with weights that sum to one. Which experts a token visits
depends on the token, on its neighbours and on the layer: early layers route by spelling, later layers by
meaning. Studying those choices means recording them, token by token, layer by layer, and asking how often
the same expert comes back, how far ahead it can be predicted, and what a cache of experts would hit.
The thinker reads text, images, audio and video; here we only feed it text. Numbers such as 2048, 128 and
48 describe its shape; 3.35 billion parameters are active for each token, out of about 30 billion.
Tokens: the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.
Code: def route(x): return softmax(x @ W.T).topk(8)  # weights renormalised over the chosen experts
Unicode: Grüße aus Köln, café, naïve, Ελληνικά, русский текст, 中文文本, 日本語, 한국어, emoji 🙂🚀✨.
Questions worth asking: is routing stable across paraphrases? Do experts specialise by language?
How much does a least-recently-used cache of sixteen experts per layer save when decoding a long answer?
"""


# -- configuration ---------------------------------------------------------------------------------
def preset_config(preset: str = "tiny", *, layers: int | None = None) -> ThinkerConfig:
    """The thinker text config of a preset, optionally with another layer count."""
    if preset not in PRESETS:
        raise InputError(f"unknown synth preset {preset!r}: expected one of {', '.join(PRESETS)}")
    kw = dict(PRESETS[preset])
    if layers is not None:
        if layers < 1:
            raise InputError(f"synth: layers must be at least 1, got {layers}")
        kw["num_hidden_layers"] = int(layers)
    return ThinkerConfig(**kw)


def omni_config(cfg: ThinkerConfig, dtype: str = "bf16", *, specials: dict[str, int] | None = None) -> dict:
    """A nested Qwen3-Omni `config.json` around a thinker text config, with tiny audio/vision/talker parts.

    Multimodal token ids are the real ones when the vocabulary has the real size, else ids near its top.
    Chat-token ids come from the checkpoint's own tokenizer (`specials`) when given.
    """
    D, V, dt = cfg.hidden_size, cfg.vocab_size, DTYPE_JSON[dtype]
    real = V == 152064
    ids = dict(audio_token_id=151675 if real else V - 10, image_token_id=151655 if real else V - 9,
               video_token_id=151656 if real else V - 8, audio_start_token_id=151669 if real else V - 7,
               vision_start_token_id=151652 if real else V - 6, user_token_id=872 if real else V - 5)
    text = dict(cfg.to_text_dict(), torch_dtype=dt)
    audio = dict(model_type="qwen3_omni_moe_audio_encoder", num_mel_bins=16, encoder_layers=1,
                 encoder_attention_heads=2, encoder_ffn_dim=32, d_model=16, output_dim=D, downsample_hidden_size=8,
                 n_window=5, n_window_infer=10, max_source_positions=100, conv_chunksize=50)
    vision = dict(model_type="qwen3_omni_moe_vision_encoder", depth=1, hidden_size=16, intermediate_size=32,
                  num_heads=2, patch_size=4, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                  out_hidden_size=D, num_position_embeddings=16, deepstack_visual_indexes=[0])
    thinker = dict(model_type="qwen3_omni_moe_thinker", text_config=text, audio_config=audio, vision_config=vision,
                   tie_word_embeddings=cfg.tie_word_embeddings, initializer_range=STD, **ids)
    talker_text = dict(model_type="qwen3_omni_moe_talker_text", vocab_size=64, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                       moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                       shared_expert_intermediate_size=16, rms_norm_eps=1e-6, torch_dtype=dt,
                       rope_scaling={"mrope_section": [4, 2, 2], "interleaved": True, "mrope_interleaved": True,
                                     "rope_type": "default", "type": "default"})
    talker = dict(model_type="qwen3_omni_moe_talker", text_config=talker_text, thinker_hidden_size=D,
                  spatial_merge_size=2,
                  code_predictor_config=dict(model_type="qwen3_omni_moe_talker_code_predictor", vocab_size=64,
                                             hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                             num_code_groups=4),
                  **{k: v for k, v in ids.items() if k != "user_token_id"})
    code2wav = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                    intermediate_size=64, codebook_size=64, num_quantizers=4, decoder_dim=32,
                    upsample_rates=[2, 2], upsampling_ratios=[2, 2])
    top: dict[str, Any] = {"architectures": ["Qwen3OmniMoeForConditionalGeneration"], "model_type": "qwen3_omni_moe",
                           "enable_audio_output": True}
    if specials:
        top.update(im_start_token_id=specials.get("<|im_start|>"), im_end_token_id=specials.get("<|im_end|>"))
    top.update(thinker_config=thinker, talker_config=talker, code2wav_config=code2wav, torch_dtype=dt)
    return top


# -- the tensor plan -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Planned:
    key: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _stubs(D: int, where: str) -> list[Planned]:
    """A few tensors of each non-thinker-text component, with the names and shapes of omni_config's tiny parts."""
    table = {
        "thinker.audio_tower": [("conv2d1.weight", (8, 1, 3, 3)), ("conv2d1.bias", (8,)), ("ln_post.weight", (16,)),
                                ("ln_post.bias", (16,)), ("proj2.weight", (D, 16)), ("proj2.bias", (D,))],
        "thinker.visual": [("patch_embed.proj.weight", (16, 3, 2, 4, 4)), ("blocks.0.attn.qkv.weight", (48, 16)),
                           ("merger.ln_q.weight", (16,)), ("merger.mlp.2.weight", (D, 64))],
        # the talker's own experts: an extractor matching `.mlp.experts.` without the `thinker.` prefix picks
        # them up wrongly (all four, so that transformers can still load the folder)
        "talker": [("model.codec_embedding.weight", (64, 32)), ("model.layers.0.input_layernorm.weight", (32,))]
                  + [(f"model.layers.0.mlp.experts.{e}.{p}_proj.weight", (32, 16) if p == "down" else (16, 32))
                     for e in range(4) for p in ("gate", "up", "down")]
                  + [("codec_head.weight", (64, 32))],
        "code2wav": [("code_embedding.weight", (256, 32)), ("pre_transformer.norm.weight", (32,))],
    }
    prefixes = ["thinker.audio_tower", "thinker.visual"] if where == "front" else ["talker", "code2wav"]
    return [Planned(f"{p}.{k}", s) for p in prefixes for k, s in table[p]]


def tensor_plan(cfg: ThinkerConfig, *, stubs: bool = True) -> list[Planned]:
    """Every tensor of the synthetic checkpoint, in file order: stubs, embeddings, layer by layer (one
    expert's three matrices next to each other), final norm, lm_head, more stubs."""
    D, hd, E, I, V = cfg.hidden_size, cfg.head_dim, cfg.num_experts, cfg.moe_intermediate_size, cfg.vocab_size
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    plan = _stubs(D, "front") if stubs else []
    plan.append(Planned("thinker.model.embed_tokens.weight", (V, D)))
    for i in range(cfg.num_hidden_layers):
        p = f"thinker.model.layers.{i}."
        plan += [Planned(p + "input_layernorm.weight", (D,)),
                 Planned(p + "self_attn.q_proj.weight", (q, D)), Planned(p + "self_attn.k_proj.weight", (kv, D)),
                 Planned(p + "self_attn.v_proj.weight", (kv, D)), Planned(p + "self_attn.o_proj.weight", (D, q)),
                 Planned(p + "self_attn.q_norm.weight", (hd,)), Planned(p + "self_attn.k_norm.weight", (hd,)),
                 Planned(p + "post_attention_layernorm.weight", (D,)), Planned(p + "mlp.gate.weight", (E, D))]
        for e in range(E):
            x = f"{p}mlp.experts.{e}."
            plan += [Planned(x + "gate_proj.weight", (I, D)), Planned(x + "up_proj.weight", (I, D)),
                     Planned(x + "down_proj.weight", (D, I))]
    plan.append(Planned("thinker.model.norm.weight", (D,)))
    if not cfg.tie_word_embeddings:
        plan.append(Planned("thinker.lm_head.weight", (V, D)))
    if stubs:
        plan += _stubs(D, "back")
    return plan


def split_shards(plan: list[Planned], itemsize: int, shards: int | None = None) -> list[list[Planned]]:
    """Cut the plan into shards of about equal bytes at tensor boundaries (so shard cuts fall inside layers).

    `shards=None` picks max(3, total / 4 GiB). Each shard gets at least one tensor, so a big tensor can push
    a cut later than the even split; more shards than tensors is an `InputError`.
    """
    total = sum(t.numel for t in plan) * itemsize
    n = max(MIN_SHARDS, math.ceil(total / SHARD_TARGET)) if shards is None else int(shards)
    if n < 1:
        raise InputError(f"synth: shards must be at least 1, got {shards}")
    if n > len(plan):
        if shards is not None:
            raise InputError(f"synth: cannot cut {len(plan)} tensors into {n} non-empty shards")
        n = len(plan)
    starts, acc = [], 0
    for t in plan:
        starts.append(acc)
        acc += t.numel * itemsize
    cuts = [0]
    for k in range(1, n):
        # first tensor starting at or after k/n of the bytes, but leave one tensor for each later shard
        c = next((i for i, s in enumerate(starts) if s * n >= k * total), len(plan))
        cuts.append(min(max(c, cuts[-1] + 1), len(plan) - (n - k)))
    cuts.append(len(plan))
    return [plan[a:b] for a, b in zip(cuts, cuts[1:])]


def shard_name(k: int, n: int) -> str:
    return f"model-{k:05d}-of-{n:05d}.safetensors"


# -- values and files ------------------------------------------------------------------------------
def _is_norm(key: str) -> bool:
    parts = key.split(".")
    leaf = parts[-2] if len(parts) >= 2 else ""
    return parts[-1] == "weight" and ("norm" in leaf or leaf.startswith("ln_"))


def make_tensor(key: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> torch.Tensor:
    """The synthetic value of one tensor: N(0, 0.02²), or 1 + N(0, 0.02²) for norm weights (never exactly 1,
    so a norm read as 1 + w, or not applied, shows). Depends only on (seed, key, shape, dtype)."""
    h = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & (2**63 - 1))
    t = torch.empty(shape, dtype=torch.float32).normal_(1.0 if _is_norm(key) else 0.0, STD, generator=g)
    return t.to(dtype)


def _header(entries: list[Planned], dtype: torch.dtype, seed: int) -> tuple[bytes, int]:
    """The safetensors header bytes (length prefix included) and the data size that follows."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    head: dict[str, Any] = {"__metadata__": {"format": "pt", "generator": GENERATOR, "seed": str(seed)}}
    off = 0
    for t in entries:
        n = t.numel * itemsize
        head[t.key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(t.shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header so that the data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw, off


def _complete(path: Path, header: bytes, data_size: int) -> bool:
    """A shard left by an earlier run with the same plan, seed and generator: safe to keep (resume)."""
    if not path.is_file() or path.is_symlink() or path.stat().st_size != len(header) + data_size:
        return False
    with open(path, "rb") as f:
        return f.read(len(header)) == header


def _shard_writer(header: bytes, entries: list[Planned], dtype: torch.dtype, seed: int, bar):
    """What `OutputDir.write` calls with the temporary file: the header, then each tensor as it is drawn."""
    def write(f) -> None:
        f.write(header)
        for t in entries:
            x = make_tensor(t.key, t.shape, seed, dtype)
            f.write(memoryview(x.view(torch.uint8).reshape(-1).numpy()))
            bar.update(x.numel() * x.element_size())
    return write


def _check_out(d: OutputDir, names: set[str], remaining: int) -> None:
    """Refuse a folder holding anything synth did not write (or that changed since), or shards of another
    shard count; then check the free space."""
    foreign = d.foreign()
    shards = sorted({f for f in foreign if f.startswith("model") and ".safetensors" in f and
                     f.removesuffix(".tmp") not in names} |
                    {p.name for p in d.path.glob("model*.safetensors") if p.name not in names})
    if shards:
        raise InputError(f"{d.path}: holds shards of another checkpoint ({', '.join(shards[:4])}"
                         f"{' ...' if len(shards) > 4 else ''}): remove them or choose an empty folder")
    if foreign:
        raise InputError(f"{d.path}: holds files q3lab synth did not write, or that changed since it wrote them "
                         f"({', '.join(foreign[:8])}{' ...' if len(foreign) > 8 else ''}): nothing was "
                         f"overwritten; remove them or choose an empty folder")
    free = shutil.disk_usage(d.path).free
    if free < remaining:
        raise InputError(f"{d.path}: {remaining / 2**30:.2f} GiB of shards to write, only {free / 2**30:.2f} GiB "
                         f"free")


# -- the entry point -------------------------------------------------------------------------------
def synth(out: str | Path, preset: str = "tiny", *, seed: int = 0, layers: int | None = None, dtype: str = "bf16",
          stubs: bool = True, shards: int | None = None, progress: bool = True) -> Path:
    """Write a random checkpoint of `preset` in the official Qwen3-Omni layout to `out`; return `out`.

    An interrupted run can be repeated with the same arguments: complete shards are kept, the rest rewritten.
    """
    if dtype not in DTYPES:
        raise InputError(f"synth: unknown dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    cfg = preset_config(preset, layers=layers)
    tdtype = DTYPES[dtype]
    itemsize = torch.empty((), dtype=tdtype).element_size()
    plan = tensor_plan(cfg, stubs=stubs)
    groups = split_shards(plan, itemsize, shards)
    n = len(groups)
    names = [shard_name(k + 1, n) for k in range(n)]

    out = Path(out)
    # a new or empty folder, or one synth made itself (its marker lists what it wrote): nothing else is touched
    d = OutputDir.claim(out, "synth")
    total = sum(t.numel for t in plan) * itemsize
    headers = [_header(g, tdtype, seed) for g in groups]
    done = [d.ours(name) and _complete(out / name, head, size) for (head, size), name in zip(headers, names)]
    _check_out(d, set(names), total - sum(size for (_, size), ok in zip(headers, done) if ok))
    # Until the new index is written, the folder must not look like a complete checkpoint.
    d.remove(INDEX)

    tok = train_bpe([SAMPLE_TEXT], min(cfg.vocab_size, TOKENIZER_VOCAB_CAP))
    check_vocab(tok, cfg.vocab_size)
    with tempfile.TemporaryDirectory(prefix="q3lab-synth-") as tmp:   # then copied in atomically, one by one
        save_tokenizer(tok, tmp, model_max_length=cfg.max_position_embeddings)
        for name in sorted(os.listdir(tmp)):
            d.write(name, Path(tmp) / name)
    specials = {t.content: i for i, t in tok.get_added_tokens_decoder().items()}
    d.write("config.json", (json.dumps(omni_config(cfg, dtype, specials=specials), indent=2) + "\n").encode())

    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"synth {preset}",
              disable=not progress) as bar:
        for group, name, (head, size), ok in zip(groups, names, headers, done):
            if ok:
                d.keep(name)
                bar.update(size)
            else:
                d.write(name, _shard_writer(head, group, tdtype, seed, bar))

    # The index goes last: its presence means every shard it names is complete.
    index = {"metadata": {"total_size": total},
             "weight_map": dict(sorted((t.key, name) for group, name in zip(groups, names) for t in group))}
    d.write(INDEX, (json.dumps(index, indent=2) + "\n").encode())
    return out
