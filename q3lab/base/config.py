"""ThinkerConfig: the thinker text model's hyper-parameters, read from a checkpoint's config.json."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from q3lab.base import jsonio
from q3lab.errors import CheckpointError

# The real thinker text model has 18,531 tensors. A config implying more than this is corrupt, and listing its
# tensors (the audit does) would exhaust memory instead of failing.
MAX_TENSORS = 1 << 20
SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
         "num_experts", "num_experts_per_tok", "moe_intermediate_size", "max_position_embeddings")
FLAGS = ("norm_topk_prob", "mrope_interleaved", "tie_word_embeddings")
# Tensor dimensions stay within int32 (the real model's largest is 152,064); positions within int64.
MAX_SIZE = {**{k: 2**31 - 1 for k in SIZES}, "max_position_embeddings": 2**63 - 1}


@dataclass
class ThinkerConfig:
    vocab_size: int = 152064
    hidden_size: int = 2048
    num_hidden_layers: int = 48
    num_attention_heads: int = 32
    num_key_value_heads: int = 4
    head_dim: int = 128
    num_experts: int = 128
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    norm_topk_prob: bool = True
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: list[int] = field(default_factory=lambda: [24, 20, 20])
    mrope_interleaved: bool = True
    max_position_embeddings: int = 65536
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"

    def __post_init__(self) -> None:
        bad = [f"{k} {getattr(self, k)!r} (expected an integer)" for k in SIZES if type(getattr(self, k)) is not int]
        bad += [f"{k} {getattr(self, k)!r} (expected true or false)" for k in FLAGS
                if type(getattr(self, k)) is not bool]
        bad += [f"{k} {getattr(self, k)!r} (expected a number)" for k in ("rms_norm_eps", "rope_theta")
                if type(getattr(self, k)) not in (int, float)]
        if not (isinstance(self.mrope_section, list) and len(self.mrope_section) == 3
                and all(type(s) is int for s in self.mrope_section)):
            bad.append(f"mrope_section {self.mrope_section!r} (expected a list of 3 integers)")
        if type(self.hidden_act) is not str:
            bad.append(f"hidden_act {self.hidden_act!r} (expected a string)")
        if bad:  # types first: a float size would be silently truncated, true read as 1 (rms_norm_eps: true)
            raise CheckpointError("invalid thinker text config: wrong type: " + ", ".join(bad))
        bad = [f"{k} {getattr(self, k)}" for k in SIZES if not 1 <= getattr(self, k) <= MAX_SIZE[k]]
        for k in ("rms_norm_eps", "rope_theta"):
            v = getattr(self, k)
            if not 0 < (float(v) if abs(v) < 1e308 else math.inf) < math.inf:
                bad.append(f"{k} {v}")
            else:
                setattr(self, k, float(v))
        if min(self.mrope_section) < 0:
            bad.append(f"mrope_section {self.mrope_section} (expected 3 sizes >= 0)")
        if bad:  # checked first: a zero head count would divide by zero below
            raise CheckpointError("invalid thinker text config: not positive, or out of range: " + ", ".join(bad))
        count = 3 + self.num_hidden_layers * (9 + 3 * self.num_experts)
        if count > MAX_TENSORS:
            raise CheckpointError(f"invalid thinker text config: {self.num_hidden_layers} layers of {self.num_experts} "
                                  f"experts imply {count:,} tensors, more than the {MAX_TENSORS:,} q3lab accepts")
        problems = []
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                            f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:  # rotary embeddings rotate pairs of dimensions
            problems.append(f"head_dim {self.head_dim} is odd; rotary embeddings need an even head_dim")
        elif sum(self.mrope_section) != self.head_dim // 2:
            problems.append(f"mrope_section {self.mrope_section} sums to {sum(self.mrope_section)}, "
                            f"expected head_dim/2 = {self.head_dim // 2}")
        if not 0 < self.num_experts_per_tok <= self.num_experts:
            problems.append(f"num_experts_per_tok {self.num_experts_per_tok} not in 1..{self.num_experts}")
        if self.hidden_act != "silu":
            problems.append(f"hidden_act {self.hidden_act!r} is not supported (only silu)")
        if problems:
            raise CheckpointError("invalid thinker text config: " + "; ".join(problems))

    # -- derived sizes -------------------------------------------------------------------------
    @property
    def expert_numel(self) -> int:
        return 3 * self.moe_intermediate_size * self.hidden_size

    # -- reading -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, cfg: dict[str, Any], *, where: str = "config.json") -> "ThinkerConfig":
        """Accept the nested Qwen3-Omni config, a thinker config, or a bare text config.

        Values are checked field by field, never converted: sizes must be JSON integers (not 64.9, true or
        "4"), eps and theta positive finite numbers, flags true/false; anything else raises CheckpointError
        naming the field."""
        text = find_text_config(cfg, where=where)
        required = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "num_experts", "num_experts_per_tok", "moe_intermediate_size"]
        missing = [k for k in required if k not in text]
        if missing:
            raise CheckpointError(f"{where}: thinker text config lacks {', '.join(missing)}")
        rope: dict[str, Any] = {}
        for key in ("rope_scaling", "rope_parameters"):
            part = text.get(key)
            if part is not None and not isinstance(part, dict):
                raise CheckpointError(f"{where}: malformed {key} in the thinker text config: expected an object, "
                                      f"found {part!r:.80}")
            rope.update(part or {})
        theta = rope.get("rope_theta", text.get("rope_theta", 1_000_000.0))
        head_dim = text.get("head_dim")
        if head_dim is None:  # older configs leave it implied
            hidden, heads = text["hidden_size"], text["num_attention_heads"]
            if not (type(hidden) is int and type(heads) is int and heads > 0 and hidden % heads == 0):
                raise CheckpointError(f"{where}: no head_dim in the thinker text config, and hidden_size {hidden!r} "
                                      f"is not a multiple of num_attention_heads {heads!r}")
            head_dim = hidden // heads
        section = rope.get("mrope_section")
        if section is None:
            section = [head_dim // 2, 0, 0] if type(head_dim) is int else None
        interleaved = rope.get("mrope_interleaved", rope.get("interleaved", True))
        mlp_only, step = text.get("mlp_only_layers"), text.get("decoder_sparse_step", 1)
        if not isinstance(mlp_only, (list, type(None))) or type(step) is not int:
            raise CheckpointError(f"{where}: malformed mlp_only_layers {mlp_only!r:.80} or decoder_sparse_step "
                                  f"{step!r:.80} in the thinker text config")
        if mlp_only or step != 1:
            raise CheckpointError(f"{where}: dense (mlp_only) layers are not supported: "
                                  f"mlp_only_layers={mlp_only}, decoder_sparse_step={step}")
        if text.get("shared_expert_intermediate_size"):
            raise CheckpointError(f"{where}: shared experts are not supported "
                                  f"(shared_expert_intermediate_size={text['shared_expert_intermediate_size']!r:.80})")
        thinker = cfg.get("thinker_config")
        tie = (thinker if isinstance(thinker, dict) else {}).get("tie_word_embeddings",
                                                                 text.get("tie_word_embeddings", False))
        try:
            return cls(
                vocab_size=text["vocab_size"], hidden_size=text["hidden_size"],
                num_hidden_layers=text["num_hidden_layers"], num_attention_heads=text["num_attention_heads"],
                num_key_value_heads=text["num_key_value_heads"], head_dim=head_dim,
                num_experts=text["num_experts"], num_experts_per_tok=text["num_experts_per_tok"],
                moe_intermediate_size=text["moe_intermediate_size"],
                norm_topk_prob=text.get("norm_topk_prob", True),
                rms_norm_eps=text.get("rms_norm_eps", 1e-6), rope_theta=theta,
                mrope_section=section, mrope_interleaved=interleaved,
                max_position_embeddings=text.get("max_position_embeddings", 65536),
                tie_word_embeddings=tie, hidden_act=text.get("hidden_act", "silu"),
            )
        except CheckpointError as e:
            raise CheckpointError(f"{where}: {e}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "ThinkerConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        return cls.from_dict(read_json(path, CheckpointError), where=str(path))

    def to_text_dict(self) -> dict[str, Any]:
        """A text config in the official key names (what a Qwen3-Omni config.json holds)."""
        d = asdict(self)
        sec = d.pop("mrope_section")
        inter = d.pop("mrope_interleaved")
        theta = d.pop("rope_theta")
        d.update(model_type="qwen3_omni_moe_text", rope_theta=theta, decoder_sparse_step=1, mlp_only_layers=[],
                 attention_bias=False, sliding_window=None, intermediate_size=4 * self.hidden_size,
                 rope_scaling={"mrope_section": sec, "interleaved": inter, "mrope_interleaved": inter,
                               "rope_type": "default", "type": "default"})
        return d

    # -- the tensors this config implies ---------------------------------------------------------
    def expected_tensors(self) -> dict[str, tuple[int, ...]]:
        """Every canonical tensor name of the thinker text model, with its shape, in load order."""
        D, hd, E, I, V = self.hidden_size, self.head_dim, self.num_experts, self.moe_intermediate_size, self.vocab_size
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, D)}
        for i in range(self.num_hidden_layers):
            p = f"model.layers.{i}."
            out.update({
                p + "input_layernorm.weight": (D,),
                p + "self_attn.q_proj.weight": (q, D),
                p + "self_attn.k_proj.weight": (kv, D),
                p + "self_attn.v_proj.weight": (kv, D),
                p + "self_attn.o_proj.weight": (D, q),
                p + "self_attn.q_norm.weight": (hd,),
                p + "self_attn.k_norm.weight": (hd,),
                p + "post_attention_layernorm.weight": (D,),
                p + "mlp.gate.weight": (E, D),
            })
            for e in range(E):
                out.update({
                    p + f"mlp.experts.{e}.gate_proj.weight": (I, D),
                    p + f"mlp.experts.{e}.up_proj.weight": (I, D),
                    p + f"mlp.experts.{e}.down_proj.weight": (D, I),
                })
        out["model.norm.weight"] = (D,)
        if not self.tie_word_embeddings:
            out["lm_head.weight"] = (V, D)
        return out


def expert_key(layer: int, e: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.experts.{e}.{proj}_proj.weight"


def find_text_config(cfg: dict[str, Any], *, where: str = "config.json") -> dict[str, Any]:
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{where}: expected a JSON object, found {type(cfg).__name__}")
    if "thinker_config" in cfg:
        th = cfg["thinker_config"]
        if not isinstance(th, dict) or not isinstance(th.get("text_config"), dict):
            raise CheckpointError(f"{where}: thinker_config has no text_config: not a Qwen3-Omni thinker")
        return th["text_config"]
    if isinstance(cfg.get("text_config"), dict):
        return cfg["text_config"]
    if "num_experts" in cfg and "hidden_size" in cfg:
        return cfg
    raise CheckpointError(f"{where}: no thinker text config found (expected thinker_config.text_config, "
                          f"text_config, or a bare MoE text config with num_experts); keys: {sorted(cfg)[:12]}")


def read_json(path: Path, error=CheckpointError) -> Any:
    """A config-like JSON file, read within q3lab's bounds (`q3lab.base.jsonio`); failures raise `error`."""
    return jsonio.read_json(path, error, kind="config")
