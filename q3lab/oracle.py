"""transformers' own Qwen3-Omni thinker text model, loaded with the same tensors, as an oracle.

Needs the `reference` extra (transformers). Only the text model is built (no audio or vision towers),
so this works for the real 30B config too, given the memory.
"""
from __future__ import annotations

import torch

from q3lab.base.config import ThinkerConfig
from q3lab.errors import Q3LabError


def hf_text_config(config: ThinkerConfig):
    """A transformers `Qwen3OmniMoeTextConfig` with the same numbers as ours."""
    try:
        from transformers import Qwen3OmniMoeTextConfig
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise Q3LabError("the reference needs transformers: pip install 'q3lab[reference]'") from e
    d = config.to_text_dict()
    rope = d.pop("rope_scaling")
    d.pop("rope_theta")
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": config.rope_theta,
                            "mrope_section": rope["mrope_section"], "interleaved": rope["interleaved"],
                            "mrope_interleaved": rope["mrope_interleaved"]}
    keep = {k: v for k, v in d.items() if k not in ("model_type", "tie_word_embeddings")}
    return Qwen3OmniMoeTextConfig(**keep)


class ReferenceThinker(torch.nn.Module):
    """transformers' `Qwen3OmniMoeThinkerTextModel` + an lm_head; call it with input_ids -> float logits."""

    def __init__(self, text_model, lm_head):
        super().__init__()
        self.text_model, self.lm_head = text_model, lm_head

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        h = self.text_model(input_ids=input_ids, position_ids=position_ids).last_hidden_state
        return self.lm_head(h).float()


def load_reference(source, dtype: torch.dtype = torch.float32) -> ReferenceThinker:
    """Build transformers' thinker text model and fill it from a q3lab weight source (a path, or an open source)."""
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerTextModel
    from q3lab.weights.source import open_source
    source = open_source(source)
    cfg = source.config
    hf_cfg = hf_text_config(cfg)
    hf_cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        text = Qwen3OmniMoeThinkerTextModel(hf_cfg)
    text = text.to_empty(device="cpu").to(dtype)
    text.rotary_emb.inv_freq = _inv_freq(cfg)
    lm_head = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False).to(dtype)
    _fill(text, lm_head.weight, source)
    return ReferenceThinker(text.eval(), lm_head.eval())


def _inv_freq(cfg: ThinkerConfig, device: str | torch.device = "cpu") -> torch.Tensor:
    return 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float, device=device) / cfg.head_dim))


@torch.no_grad()
def _fill(text, lm_head_weight: torch.Tensor, source) -> None:
    """Copy every text tensor of `source` into transformers' text model `text` (its HF names, experts fused as
    gate_up_proj [E, 2I, D] / down_proj [E, D, I]) and the output head."""
    cfg = source.config
    params = dict(text.named_parameters())
    for name in cfg.expected_tensors():
        if ".mlp.experts." in name or not name.startswith("model."):
            continue
        params[name[len("model."):]].copy_(source.get(name))
    for layer in range(cfg.num_hidden_layers):
        ex = text.layers[layer].mlp.experts
        for e in range(cfg.num_experts):
            g, u, d = source.expert(layer, e)
            ex.gate_up_proj[e].copy_(torch.cat([g, u], dim=0))
            ex.down_proj[e].copy_(d)
    lm_head_weight.copy_(source.get("lm_head.weight") if not cfg.tie_word_embeddings
                         else source.get("model.embed_tokens.weight"))


def text_model(generator):
    """The text decoder inside transformers' thinker (`.model.language_model` in recent versions; `.model`
    itself in earlier 5.x releases)."""
    inner = generator.model
    return getattr(inner, "language_model", inner)


def build_reference_generator(cfg: ThinkerConfig, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """transformers' `Qwen3OmniMoeThinkerForConditionalGeneration` for a text config, with tiny unused
    audio/vision towers and UNINITIALISED weights on `device` (the rotary buffer is set): fill it yourself."""
    from transformers import Qwen3OmniMoeThinkerConfig, Qwen3OmniMoeThinkerForConditionalGeneration
    text = hf_text_config(cfg).to_dict()
    D, V = cfg.hidden_size, cfg.vocab_size
    audio = dict(num_mel_bins=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, d_model=16,
                 output_dim=D, downsample_hidden_size=8, n_window=5, n_window_infer=10,
                 max_source_positions=100, conv_chunksize=50)
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=D, num_position_embeddings=16, deepstack_visual_indexes=[0])
    thinker_cfg = Qwen3OmniMoeThinkerConfig(text_config=text, audio_config=audio, vision_config=vision,
                                            audio_token_id=V - 10, image_token_id=V - 9, video_token_id=V - 8,
                                            audio_start_token_id=V - 7, vision_start_token_id=V - 6,
                                            user_token_id=V - 5)
    with torch.device("meta"):
        model = Qwen3OmniMoeThinkerForConditionalGeneration(thinker_cfg)
    model = model.to(dtype).to_empty(device=device)   # cast on meta: never hold a float32 copy of 30B weights
    text_model(model).rotary_emb.inv_freq = _inv_freq(cfg, device)
    return model.eval()


def load_reference_generator(source, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """transformers' `Qwen3OmniMoeThinkerForConditionalGeneration` (tiny unused audio/vision towers) holding
    the same text weights, so that its own `.generate` can be timed and compared with ours. The source is
    opened once and one model is built."""
    from q3lab.weights.source import open_source
    source = open_source(source)
    model = build_reference_generator(source.config, dtype=dtype, device=device)
    _fill(text_model(model), model.lm_head.weight, source)
    return model.eval()


class _ViewExperts:
    """An expert provider over transformers' fused per-layer tensors (gate_up_proj [E, 2I, D], down_proj
    [E, D, I]): gate/up/down are per-layer views, nothing is copied."""

    def __init__(self, layers, I: int):
        self.gate = [ly.mlp.experts.gate_up_proj[:, :I] for ly in layers]     # [E, I, D] each
        self.up = [ly.mlp.experts.gate_up_proj[:, I:] for ly in layers]
        self.down = [ly.mlp.experts.down_proj for ly in layers]                # [E, D, I] each

    def attach(self, model) -> None:
        pass

    def prepare(self, layer: int, experts: list[int]) -> None:
        pass

    def weights(self, layer: int, e: int):
        return self.gate[layer][e], self.up[layer][e], self.down[layer][e]


def thinker_sharing_weights(hf_model, cfg: ThinkerConfig):
    """A q3lab `Thinker` whose parameters ARE the tensors of a transformers thinker (no copy): both models then
    run on identical weights in one device's memory, e.g. the full 30B dimensions on one GPU for a benchmark."""
    from q3lab.runtime.thinker import Thinker, rope_inv_freq
    lm = text_model(hf_model)
    dev = hf_model.lm_head.weight.device
    with torch.device("meta"):
        model = Thinker(cfg)
    theirs = dict(lm.named_parameters())
    for name, _ in list(model.named_parameters()):
        if name == "lm_head.weight":
            t = hf_model.lm_head.weight
        else:
            t = theirs[name[len("model."):]]
        mod_name, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(mod_name), attr, torch.nn.Parameter(t, requires_grad=False))
    model.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta).to(dev)
    model.set_experts(_ViewExperts(lm.layers, cfg.moe_intermediate_size))
    return model.eval()
