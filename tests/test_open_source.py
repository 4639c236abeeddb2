"""One way in to weights: `q3lab.weights.source.open_source` opens a checkpoint folder or a store and applies the audit
gate; `q3lab.load`, `notebooks.open_checked`, `q3lab.extract` and the transformers oracle go through it."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import q3lab
import q3lab.weights.source as weights
from q3lab.weights.checkpoint import INDEX, Checkpoint
from q3lab.errors import CheckpointError
from q3lab.weights.store import Store
from q3lab.weights.source import WeightSource, open_source

NORM = "model.layers.1.post_attention_layernorm.weight"      # canonical name; the checkpoint key has thinker.


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return q3lab.synth(tmp_path_factory.mktemp("open") / "tiny", "tiny", seed=2, progress=False)


@pytest.fixture(scope="module")
def broken(ckpt, tmp_path_factory):
    """The checkpoint with one norm dropped from its index: it reads, but the audit fails."""
    path = shutil.copytree(ckpt, tmp_path_factory.mktemp("open") / "broken")
    ix = json.loads((path / INDEX).read_text())
    ix["weight_map"].pop(f"thinker.{NORM}")
    (path / INDEX).write_text(json.dumps(ix))
    return path


@pytest.fixture
def audits(monkeypatch):
    """Counts the audits run through the gate."""
    calls = []
    real = weights.audit_checkpoint
    monkeypatch.setattr(weights, "audit_checkpoint", lambda c: (calls.append(c.path), real(c))[1])
    return calls


def test_open_source_opens_each_kind_and_is_idempotent(ckpt, tmp_path, audits):
    src = open_source(ckpt)
    assert isinstance(src, Checkpoint) and isinstance(src, WeightSource)
    assert open_source(src) is src and audits == [ckpt]            # an open source: audited once per object
    model = q3lab.load(src)
    assert model.source is src and audits == [ckpt]
    store_path = q3lab.extract(ckpt, tmp_path / "store", progress=False)
    assert audits == [ckpt, ckpt]                                  # extract opened (and audited) its own
    store = open_source(store_path)
    assert isinstance(store, Store) and isinstance(store, WeightSource) and open_source(store) is store
    assert audits == [ckpt, ckpt]                                  # a store is checked by its manifest
    assert not isinstance(str(ckpt), WeightSource) and not isinstance(ckpt, WeightSource)
    assert torch.equal(store.get(NORM), src.get(NORM))


def test_every_caller_refuses_a_failed_audit_with_the_same_message(broken, tmp_path):
    from q3lab.viz.notebooks import open_checked
    with pytest.raises(CheckpointError) as err:
        open_source(broken)
    msg = str(err.value)
    lines = msg.splitlines()
    assert lines[0].startswith(f"audit of {broken} failed: 1 tensor problem(s), 0 shard error(s)")
    assert lines[1] == f"  missing: thinker.{NORM}  [not in the index]"
    assert lines[-1] == "FAILED: the thinker text model is incomplete or inconsistent" and len(lines) == 3
    for call in (lambda: q3lab.load(broken), lambda: open_checked(broken),
                 lambda: q3lab.extract(broken, tmp_path / "out", progress=False),
                 lambda: q3lab.load(Checkpoint(broken))):
        with pytest.raises(CheckpointError) as e:
            call()
        assert str(e.value) == msg
    assert not (tmp_path / "out").exists()
    # the names an ablation allows may be missing; without the audit the folder opens as it is
    with pytest.warns(UserWarning, match="substituted ones"):
        model = q3lab.load(broken, allow_missing=[NORM])
    assert torch.equal(model.model.layers[1].post_attention_layernorm.weight, torch.ones(64))
    assert isinstance(open_source(broken, audit=False), Checkpoint)
    assert isinstance(q3lab.open_weights(broken), Checkpoint)


def test_the_reference_generator_opens_once_and_builds_one_model(ckpt, monkeypatch):
    pytest.importorskip("transformers")
    import q3lab.oracle as reference
    opened = []
    real_open = Checkpoint.open.__func__
    monkeypatch.setattr(Checkpoint, "open", classmethod(lambda cls, p: (opened.append(p), real_open(cls, p))[1]))
    built = []
    real_build = reference.build_reference_generator
    monkeypatch.setattr(reference, "build_reference_generator", lambda *a, **k: (built.append(1), real_build(*a, **k))[1])
    monkeypatch.setattr(reference, "load_reference", lambda *a, **k: pytest.fail("a second model was built"))
    gen = reference.load_reference_generator(ckpt)
    assert len(opened) == 1 and built == [1]
    monkeypatch.undo()
    # its text model holds the same weights as the oracle, so both give the same logits
    ids = torch.randint(0, 400, (1, 7), generator=torch.Generator().manual_seed(3))
    want = reference.load_reference(ckpt)(ids)
    with torch.no_grad():
        got = gen(input_ids=ids).logits.float()
    assert (got - want).abs().max().item() < 1e-5
