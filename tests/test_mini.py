"""The shipped mini model (data/mini): intact files, the Qwen3-Omni thinker's features at small scale, the official
layout, and held-out facts ranked first by q3lab itself (ranks computed here, expected tokens from the prompt set)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

import q3lab
from q3lab.weights.checkpoint import Checkpoint, audit_checkpoint
from q3lab.base.config import ThinkerConfig
from q3lab.base.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT / "data" / "mini"
FACTS = ROOT / "data" / "prompts" / "facts.jsonl"
DOMAINS = ROOT / "data" / "prompts" / "domains.jsonl"


@pytest.fixture(scope="module")
def model():
    return q3lab.load(MINI)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(MINI)


@pytest.fixture(scope="module")
def facts():
    return [json.loads(line) for line in FACTS.read_text().splitlines() if line.strip()]


def test_checksums_cover_every_file():
    listed = {}
    for line in (MINI / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        listed[name.lstrip("*")] = digest
    present = {p.name for p in MINI.iterdir() if p.is_file() and p.name != "SHA256SUMS"}
    assert set(listed) == present
    for name, digest in listed.items():
        assert hashlib.sha256((MINI / name).read_bytes()).hexdigest() == digest, name


def test_config_keeps_every_feature():
    raw = json.loads((MINI / "config.json").read_text())
    text = raw["thinker_config"]["text_config"]          # the nested official layout
    cfg = ThinkerConfig.from_file(MINI)
    assert cfg.num_hidden_layers == 48
    assert cfg.num_attention_heads > cfg.num_key_value_heads > 0                      # GQA
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
    assert cfg.num_experts >= 32 and cfg.num_experts_per_tok >= 4 and cfg.norm_topk_prob
    assert cfg.mrope_interleaved and len(cfg.mrope_section) == 3 and min(cfg.mrope_section) > 0
    assert sum(cfg.mrope_section) == cfg.head_dim // 2
    assert not cfg.tie_word_embeddings and text["decoder_sparse_step"] == 1 and text["mlp_only_layers"] == []
    total = sum(p.stat().st_size for p in MINI.iterdir() if p.suffix == ".safetensors")
    assert total <= 24_000_000


def test_official_layout():
    ckpt = Checkpoint(MINI)
    assert ckpt.prefix == "thinker." and len(ckpt.shards) >= 2
    report = audit_checkpoint(ckpt)
    assert report.ok, report.summary()
    assert report.straddling                                    # a layer split across shards, as in the real one
    assert set(report.frame["dtype"]) == {"BF16"}
    # QK-norm and the untied head are real, trained tensors
    q_norm = ckpt.get("model.layers.0.self_attn.q_norm.weight").float()
    assert not torch.allclose(q_norm, torch.ones_like(q_norm))
    assert not torch.equal(ckpt.get("lm_head.weight"), ckpt.get("model.embed_tokens.weight"))


# Demo facts that notebooks show; chosen among prompts the shipped model gets right, so this guards the loading
# and running path. The quality claim (>= 80% of all held-out prompts) is the next test.
HANDFUL = ["The capital of France is", "The capital of Germany is", "France, a country in", "Japan, a country in",
           "The language of France is", "The language of Brazil is"]


@pytest.fixture(scope="module")
def ranks(model, tok, facts):
    """Rank (1 = first) of each held-out fact's expected token after its prompt, in right-padded batches
    (causal attention and per-token routing: padding after a prompt cannot change its last logits)."""
    out = {}
    for start in range(0, len(facts), 128):    # 128 a batch: about 3x faster on the CPU than all at once
        rows = facts[start:start + 128]
        enc = [tok.encode(f["prompt"]) for f in rows]
        ids = torch.full((len(enc), max(map(len, enc))), tok.token_to_id("<|endoftext|>"))
        for i, e in enumerate(enc):
            ids[i, :len(e)] = torch.tensor(e)
        with torch.no_grad():
            logits = model(ids)
        last = logits[torch.arange(len(enc)), torch.tensor([len(e) - 1 for e in enc])]     # [prompts, V]
        for i, f in enumerate(rows):
            (exp,) = tok.encode(f["expected"])
            out[f["prompt"]] = int((last[i] > last[i, exp]).sum()) + 1
    return out


def test_handful_of_held_out_facts_ranked_first(facts, ranks):
    by_prompt = {f["prompt"]: f for f in facts}
    assert all(p in by_prompt for p in HANDFUL)             # expected tokens come from the prompt set
    assert {p: ranks[p] for p in HANDFUL} == {p: 1 for p in HANDFUL}


def test_held_out_accuracy_at_least_80_percent(ranks):
    assert len(ranks) >= 300
    assert sum(r == 1 for r in ranks.values()) / len(ranks) >= 0.8


def test_prompt_sets_are_well_formed(tok, facts):
    assert len(facts) >= 300 and len({f["prompt"] for f in facts}) == len(facts)
    for f in facts:
        assert len(tok.encode(f["expected"])) == 1 and f["answer"].startswith(f["expected"])
    domains = [json.loads(line) for line in DOMAINS.read_text().splitlines() if line.strip()]
    assert {d["domain"] for d in domains} == {"code", "license", "facts", "math"}
