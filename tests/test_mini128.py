"""The shipped mini128 model (data/mini128: 48 layers x 128 experts, top-8) and its router-saturation probes:
intact files, the real expert topology, held-out facts ranked first and no dead expert by q3lab itself, and
q3lab.analysis.saturation against a hand computation and on the shipped probes."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import q3lab
from q3lab.weights.checkpoint import Checkpoint, audit_checkpoint
from q3lab.base.config import ThinkerConfig
from q3lab.errors import InputError
from q3lab.analysis.saturation import load_probes, plot_saturation, router_saturation
from q3lab.base.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
M128 = ROOT / "data" / "mini128"
FACTS = ROOT / "data" / "prompts" / "facts.jsonl"
DOMAINS = ROOT / "data" / "prompts" / "domains.jsonl"


@pytest.fixture(scope="module")
def model():
    return q3lab.load(M128)


@pytest.fixture(scope="module")
def probes():
    return load_probes(M128 / "probes")


def route(model, ids: torch.Tensor) -> np.ndarray:
    """Top-k ids in rank order of every token and layer: [tokens, L, A]."""
    got = {}
    hooks = [layer.mlp.hook_topk_ids.register_forward_hook(lambda m, i, out, l=l: got.__setitem__(l, out))
             for l, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack([got[l] for l in range(len(got))], 1).numpy()


# -- files --------------------------------------------------------------------------------------------------
def test_manifest_covers_every_file_weights_and_probes():
    listed = {}
    for line in (M128 / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        listed[name.lstrip("*")] = digest
    present = {p.relative_to(M128).as_posix() for p in M128.rglob("*") if p.is_file() and p.name != "SHA256SUMS"}
    assert set(listed) == present
    assert {"probes/routing.npy", "probes/tokens.npy", "probes/index.json"} <= present
    for name, digest in listed.items():
        assert hashlib.sha256((M128 / name).read_bytes()).hexdigest() == digest, name


def test_real_expert_topology_within_40_mb():
    cfg = ThinkerConfig.from_file(M128)
    text = json.loads((M128 / "config.json").read_text())["thinker_config"]["text_config"]
    assert (cfg.num_hidden_layers, cfg.num_experts, cfg.num_experts_per_tok) == (48, 128, 8)
    assert cfg.norm_topk_prob and not cfg.tie_word_embeddings
    assert text["decoder_sparse_step"] == 1 and text["mlp_only_layers"] == [] and "shared_expert" not in str(text)
    assert cfg.num_attention_heads > cfg.num_key_value_heads > 0                      # GQA
    assert cfg.mrope_interleaved and sum(cfg.mrope_section) == cfg.head_dim // 2
    assert cfg.vocab_size == 4096
    total = sum(p.stat().st_size for p in M128.glob("*.safetensors"))
    assert total <= 40_000_000
    # one vocabulary with data/mini
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (M128 / f).read_bytes() == (ROOT / "data" / "mini" / f).read_bytes()


def test_official_layout():
    ckpt = Checkpoint(M128)
    report = audit_checkpoint(ckpt)
    assert report.ok, report.summary()
    assert ckpt.prefix == "thinker." and len(ckpt.shards) == 3 and report.straddling
    assert set(report.frame["dtype"]) == {"BF16"}
    q_norm = ckpt.get("model.layers.0.self_attn.q_norm.weight").float()
    assert not torch.allclose(q_norm, torch.ones_like(q_norm))                       # QK-norm is trained


# -- quality ------------------------------------------------------------------------------------------------
def test_held_out_facts_top1_at_least_80_percent(model):
    """All 379 held-out prompts (data/prompts/facts.jsonl), ranked by q3lab on the CPU."""
    tok = load_tokenizer(M128)
    facts = [json.loads(line) for line in FACTS.read_text().splitlines() if line.strip()]
    hits = []
    for start in range(0, len(facts), 128):
        rows = facts[start:start + 128]
        enc = [tok.encode(f["prompt"]) for f in rows]
        ids = torch.full((len(enc), max(map(len, enc))), tok.token_to_id("<|endoftext|>"))
        for i, e in enumerate(enc):
            ids[i, :len(e)] = torch.tensor(e)       # right padding: causal attention never sees it
        with torch.no_grad():
            logits = model(ids)
        last = logits[torch.arange(len(enc)), torch.tensor([len(e) - 1 for e in enc])]
        for i, f in enumerate(rows):
            (exp,) = tok.encode(f["expected"])
            hits.append(bool(last[i].argmax() == exp))
    assert len(hits) == 379
    assert sum(hits) / len(hits) >= 0.8


def test_no_dead_expert_on_validation_sample(model, probes):
    """Every expert of every layer is chosen on a validation sample: the 2,048 probe tokens (the last 512 of
    each domain's validation stream) and the 96 validation snippets of data/prompts/domains.jsonl. Also: the
    final probe checkpoint is this model's routing (recomputed here by q3lab)."""
    tok = load_tokenizer(M128)
    segs = probes.index["segments"]
    ids = route(model, torch.from_numpy(probes.tokens.astype(np.int64)).view(len(segs), -1))   # [T, L, A]
    final = probes.ids[-1]
    assert (ids[..., 0] == final[..., 0]).mean() >= 0.995
    counts = np.zeros((48, 128), dtype=np.int64)
    for l in range(48):
        counts[l] = np.bincount(ids[:, l].reshape(-1), minlength=128)
    snippets = [json.loads(line)["prompt"] for line in DOMAINS.read_text().splitlines() if line.strip()]
    enc = [tok.encode(text) for text in snippets]
    batch = torch.full((len(enc), max(map(len, enc))), tok.token_to_id("<|endoftext|>"))
    for i, e in enumerate(enc):
        batch[i, :len(e)] = torch.tensor(e)       # right padding, causal: real positions route as alone
    real = (torch.arange(batch.shape[1])[None] < torch.tensor([len(e) for e in enc])[:, None]).reshape(-1)
    got = route(model, batch)[real.numpy()]                                     # padding positions dropped
    for l in range(48):
        counts[l] += np.bincount(got[:, l].reshape(-1), minlength=128)
    dead = np.argwhere(counts == 0)
    assert len(dead) == 0, f"(layer, expert) never chosen: {dead[:10].tolist()}"


# -- saturation -----------------------------------------------------------------------------------------------
def test_router_saturation_hand_example():
    # 3 checkpoints, 2 tokens, 1 layer, top-2 ids (rank order). Final (c=2): token 0 -> {1, 2}, token 1 -> {3, 0}.
    ids = np.array([[[[2, 5]], [[4, 6]]],         # c0: token 0 shares 2 (not top-1), token 1 shares none
                    [[[1, 3]], [[3, 0]]],         # c1: token 0 top-1 right, shares 1; token 1 identical
                    [[[1, 2]], [[3, 0]]]])        # final
    frame = router_saturation(ids, steps=[0, 10, 20], ks=(1, 2))
    assert list(frame.columns) == ["checkpoint", "step", "layer", "k", "saturation"]
    got = {(r.step, r.k): r.saturation for r in frame.itertuples()}
    assert got == {(0, 1): 0.0, (10, 1): 1.0, (20, 1): 1.0,                     # top-1: 0/2, 2/2, 2/2
                   (0, 2): 0.25, (10, 2): 0.75, (20, 2): 1.0}                   # top-2: (1/2 + 0)/2, (1/2 + 1)/2
    with pytest.raises(InputError, match="lists an expert twice"):
        router_saturation(np.array([[[[1, 1]]]]), ks=(1,))
    with pytest.raises(InputError, match="outside"):
        router_saturation(ids)                        # default ks (1, 8): these ids hold only the top-2


def test_shipped_probes_saturation(probes):
    C, T, L, A = probes.ids.shape
    assert C >= 8 and T >= 2000 and (L, A) == (48, 8) and probes.ids.dtype == np.uint8
    assert probes.steps == sorted(probes.steps) and probes.steps[0] == 0
    assert probes.steps[-1] == probes.index["total_steps"]
    frame = router_saturation(probes)
    assert len(frame) == C * L * 2
    final = frame[frame["checkpoint"] == C - 1]
    assert (final["saturation"] == 1.0).all()
    mean = frame.groupby(["k", "checkpoint"])["saturation"].mean()
    # step 0 (random init) is near chance: k / E for top-k, 1/128 for top-1
    assert mean[(8, 0)] < 0.15 and mean[(1, 0)] < 0.1
    # half-way through the run most top-8 ids already match the final model
    half = int(np.argmin([abs(s - probes.steps[-1] / 2) for s in probes.steps]))
    assert mean[(8, half)] > 0.5 > mean[(8, 0)]
    fig = plot_saturation(frame, title="mini128")
    assert len(fig.axes) == 2


def test_aux_loss_is_global_batch():
    """train_mini's load-balancing loss: E * sum_i f_i P_i over all tokens of the batch (both sequences pooled),
    which differs from the mean of per-sequence losses."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import train_mini as tm

    cfg = ThinkerConfig(**{**tm.MINI, "num_hidden_layers": 1, "num_experts": 8, "num_experts_per_tok": 2,
                           "moe_intermediate_size": 4, "hidden_size": 16, "head_dim": 8,
                           "mrope_section": [2, 1, 1]})
    model = tm.build_model(cfg)
    tm.init_weights(model, 0)
    model.train()
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    got = {}
    mlp = model.model.layers[0].mlp
    hooks = [mlp.hook_topk_ids.register_forward_hook(lambda m, i, out: got.__setitem__("idx", out)),
             mlp.experts.register_forward_hook(lambda m, i, out: got.__setitem__("h", i[0]))]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    idx, h = got["idx"], got["h"]                                                # [32, 2], [32, D]
    probs = torch.softmax(mlp.gate(h).float(), -1)                               # [32, 8]

    def lbl(rows):
        f = torch.bincount(idx[rows].reshape(-1), minlength=8).float() / idx[rows].numel()
        return 8 * (f * probs[rows].mean(0)).sum()

    pooled = lbl(slice(0, 32))
    assert torch.allclose(mlp.experts.aux, pooled, rtol=1e-5)
    per_seq = (lbl(slice(0, 16)) + lbl(slice(16, 32))) / 2
    assert abs(pooled - per_seq) > 1e-4
