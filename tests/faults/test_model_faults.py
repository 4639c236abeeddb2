"""Model and generation under bad input and faults: out-of-vocabulary ids, empty prompts, too-long requests,
padded batches, a cache too small for top-k, a store whose manifest and files disagree, and expert files
vanishing under a running cached model."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import q3lab
from faultkit import cli, copy_ckpt, snapshot
from q3lab.errors import CheckpointError, InputError, StoreError
from q3lab.runtime.experts import ExpertCache
from q3lab.weights.extraction import extract, verify
from q3lab.weights.store import MANIFEST, Store

V, MAX_POS, TOP_K = 512, 2048, 2  # the tiny preset


@pytest.fixture(scope="module")
def store(tiny_ckpt, tmp_path_factory) -> Path:
    return extract(tiny_ckpt, tmp_path_factory.mktemp("model_faults") / "store", progress=False)


@pytest.fixture(scope="module")
def model(store):
    return q3lab.load(store)


def ids(*rows: list[int]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long)


PROMPT = ids([5, 17, 99, 3, 250, 41, 7])


# -- input ids, lengths ------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [V, V + 1000, -1])
def test_token_ids_outside_the_vocabulary(model, bad):
    before = model(PROMPT)
    prompt = PROMPT.clone()
    prompt[0, 3] = bad
    for call in (lambda: model(prompt), lambda: model.generate(prompt, 3)):
        with pytest.raises(InputError, match=rf"token id {bad} is outside the vocabulary \[0, {V}\)"):
            call()
    assert torch.equal(model(PROMPT), before)  # nothing about the model changed


def test_empty_prompt(model):
    for empty in (torch.zeros(1, 0, dtype=torch.long), torch.zeros(0, dtype=torch.long)):
        with pytest.raises(InputError, match="empty prompt: input_ids has no tokens"):
            model.generate(empty, 4)
    with pytest.raises(InputError, match="empty prompt"):
        model(torch.zeros(2, 0, dtype=torch.long))


def test_prompt_plus_new_tokens_longer_than_max_positions(model):
    with pytest.raises(InputError, match=rf"prompt \(7\) \+ max_new_tokens \({MAX_POS - 6}\) = {MAX_POS + 1} exceeds "
                                         rf"max_position_embeddings {MAX_POS}"):
        model.generate(PROMPT, MAX_POS - 6)
    long = torch.arange(MAX_POS + 1)[None] % V
    with pytest.raises(InputError, match=f"{MAX_POS + 1} tokens exceed max_position_embeddings {MAX_POS}"):
        model(long)
    assert model(long[:, :MAX_POS], last_only=True).shape == (1, 1, V)  # the limit itself is allowed
    cache = model.new_cache(1, 8)
    model(PROMPT, cache=cache)
    with pytest.raises(InputError, match="cache holds 8 tokens; 7 cached \\+ 2 new do not fit"):
        model(ids([1, 2]), cache=cache)


# -- padding -----------------------------------------------------------------------------------------
def test_left_padded_batch_equals_each_row_alone(model):
    a, b = [5, 17, 99, 3, 250, 41, 7], [300, 12, 8]
    batch = ids(a, [0] * 4 + b)
    mask = ids([1] * 7, [0] * 4 + [1] * 3)
    logits = model(batch, attention_mask=mask)
    torch.testing.assert_close(logits[0], model(ids(a))[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[1, 4:], model(ids(b))[0], rtol=0, atol=1e-5)
    got = model.generate(batch, 6, attention_mask=mask)
    assert got[0, 7:].tolist() == model.generate(ids(a), 6)[0, 7:].tolist()
    assert got[1, 7:].tolist() == model.generate(ids(b), 6)[0, 3:].tolist()


def test_padding_that_generate_cannot_honour_is_refused(model):
    batch = ids([5, 17, 99, 3], [300, 12, 0, 0])
    right = ids([1, 1, 1, 1], [1, 1, 0, 0])
    with pytest.raises(InputError, match=r"row\(s\) \[1\] end in padding; generate needs left padding"):
        model.generate(batch, 3, attention_mask=right)
    with pytest.raises(InputError, match=r"attention_mask must be \[batch, tokens\] = \[2, 4\], got \[2, 3\]"):
        model.generate(batch, 3, attention_mask=right[:, :3])
    with pytest.raises(InputError, match=r"attention_mask must be \[B, cached \+ new\] = \[2, 4\], got \[1, 4\]"):
        model(batch, attention_mask=right[:1])


# -- the expert cache --------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, says", [
    (dict(capacity=1), f"capacity of 1 experts in all cannot hold one layer's top-k: the router picks {TOP_K} "
                       f"experts per token, so at least {TOP_K} are needed"),
    (dict(capacity=1, per_layer=True), "capacity of 1 experts per layer cannot hold one layer's top-k"),
    (dict(capacity="40KB"), "40,000 bytes in all = 1 experts of 24,576 bytes (float32) cannot hold"),
    (dict(capacity=3, pinned=[(0, 0), (1, 1)]), f"minus 2 pinned cannot hold one layer's top-k: the router picks "
                                                f"{TOP_K} experts per token, so at least {TOP_K + 2} are needed"),
], ids=["count", "count_per_layer", "bytes", "pinned"])
def test_cache_smaller_than_top_k_is_refused(store, kwargs, says):
    with pytest.raises(InputError) as e:
        q3lab.load(store, experts=ExpertCache(**kwargs))
    assert says in str(e.value), str(e.value)


def test_expert_files_vanish_under_a_running_cached_model(store, tiny_ckpt, model, tmp_path):
    """The next miss raises a clear error naming the file, layer and expert; put back, the model carries on
    and still computes exactly what the all-resident model does."""
    prompt = ids(list(range(3, 40)))        # 37 tokens: every layer uses more experts than the cache holds
    reference = model(prompt)
    for source, victim, error in [
        (copy_ckpt(store, tmp_path / "store"), "experts/layer_002.safetensors", StoreError),
        (copy_ckpt(tiny_ckpt, tmp_path / "ckpt"), None, CheckpointError),
    ]:
        cached = q3lab.load(source, experts=ExpertCache(TOP_K + 1, per_layer=True))
        torch.testing.assert_close(cached(PROMPT), model(PROMPT), rtol=0, atol=0)
        if victim is None:  # the checkpoint: the shard holding layer 2's expert 5
            victim = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"][
                "thinker.model.layers.2.mlp.experts.5.gate_proj.weight"]
        hidden = tmp_path / "hidden"
        (source / victim).rename(hidden)
        with pytest.raises(error) as e:
            cached(prompt)
        msg = str(e.value)
        assert f"expert cache: cannot load layer" in msg and str(source / victim) in msg, msg
        assert "No such file or directory" in msg
        hidden.rename(source / victim)
        torch.testing.assert_close(cached(prompt), reference, rtol=0, atol=0)


# -- a store whose manifest and files disagree ----------------------------------------------------
def _drop_tensor(out, m):
    m["tensors"] = [t for t in m["tensors"] if t["name"] != "model.layers.1.self_attn.o_proj.weight"]
    return ["manifest.json", "1 missing", "model.layers.1.self_attn.o_proj.weight"]


def _wrong_size(out, m):
    m["files"]["dense.safetensors"]["bytes"] += 8
    size = (out / "dense.safetensors").stat().st_size
    return ["dense.safetensors", f"{size} bytes", f"says {size + 8}"]


def _wrong_shape(out, m):
    t = next(t for t in m["tensors"] if t["name"] == "model.layers.0.self_attn.k_proj.weight")
    t["shape"] = [64, 32]
    return ["dense.safetensors", "model.layers.0.self_attn.k_proj.weight", "manifest says bf16[64, 32]",
            "config implies [32, 64]"]


def _missing_file(out, m):
    (out / "experts/layer_003.safetensors").unlink()
    return ["experts/layer_003.safetensors", "missing"]


def _swapped_files(out, m):
    shutil.copyfile(out / "experts/layer_003.safetensors", out / "experts/layer_002.safetensors")
    return ["experts/layer_002.safetensors", "model.layers.2.mlp.experts.0"]


def _other_config(out, m):
    cfg = json.loads((out / "config.json").read_text())
    cfg["thinker_config"]["text_config"]["rms_norm_eps"] = 1e-5
    (out / "config.json").write_text(json.dumps(cfg))
    return ["config.json", "does not match the manifest's fingerprint"]


@pytest.mark.parametrize("edit", [_drop_tensor, _wrong_size, _wrong_shape, _missing_file, _swapped_files,
                                  _other_config], ids=lambda f: f.__name__.strip("_"))
def test_store_whose_manifest_and_files_disagree(store, tmp_path, capsys, edit):
    out = copy_ckpt(store, tmp_path / "store")
    m = json.loads((out / MANIFEST).read_text())
    fragments = edit(out, m)
    (out / MANIFEST).write_text(json.dumps(m))
    before = snapshot(out)
    for opener in (Store.open, q3lab.load):
        with pytest.raises(StoreError) as e:
            opener(out)
        for frag in fragments:
            assert frag in str(e.value), f"{opener.__name__}: {frag!r} not in {e.value}"
    rc, text, _ = cli(capsys, "extract", "--verify", out, "--no-progress")
    assert rc == 1 and "FAILED" in text and fragments[0] in text, text
    assert not verify(out, progress=False, strict=False).ok
    assert snapshot(out) == before


# -- the same through `q3lab generate` ----------------------------------------------------------------
@pytest.mark.parametrize("argv, says", [
    (["--prompt", ""], "q3lab generate: error: empty prompt: input_ids has no tokens"),
    (["--prompt", "route", "--max-new-tokens", str(MAX_POS)], f"exceeds max_position_embeddings {MAX_POS}"),
    (["--prompt", "route", "--expert-cache", "1"], f"so at least {TOP_K} are needed"),
    (["--prompt", "route", "--expert-cache", "lots"], "cannot read 'lots' as a size in bytes"),
    (["--prompt", "route", "--max-new-tokens", "-1"], "--max-new-tokens must be >= 0, got -1"),
], ids=["empty_prompt", "too_long", "cache_below_top_k", "unreadable_size", "negative_new_tokens"])
def test_cli_generate_bad_requests_exit_2_with_one_line(store, capsys, argv, says):
    rc, out, err = cli(capsys, "generate", store, *argv)
    assert rc == 2 and out == "" and says in err and err.count("\n") == 1, err


def test_cli_generate_with_a_small_cache_works(store, capsys):
    rc, out, err = cli(capsys, "generate", store, "--prompt", "route the token", "--greedy", "--max-new-tokens", "4",
                       "--expert-cache", str(TOP_K), "--per-layer")
    assert rc == 0 and "expert cache: lru, capacity 2 experts per layer" in err, err
