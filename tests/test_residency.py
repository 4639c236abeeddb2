"""One residency engine (`q3lab.policies.Residency`) behind the host cache, the device cache and the simulator:
the simulator's hit/miss sequence equals each live cache's, access by access, for every policy, capacity,
per-layer budget and pinned set, on real model runs (a tiny synthetic checkpoint) and on random traces."""
from __future__ import annotations

import pytest
import torch

import q3lab
from q3lab.cachesim import simulate
from q3lab.experts import ExpertCache

POLICIES = ("lru", "lfu", "score", "belady")
# synth "tiny" cut to 3 layers: 3 layers x 8 experts, top-2
L, E, K = 3, 8, 2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return q3lab.synth(tmp_path_factory.mktemp("res") / "tiny3", "tiny", seed=4, layers=3, progress=False)


BATCH = torch.randint(0, 400, (2, 7), generator=torch.Generator().manual_seed(0))


def _run(model):
    """A batched prefill and decode: groups (layer calls) of several tokens, then of one."""
    with torch.inference_mode():
        return model.generate(BATCH, 10)


@pytest.fixture(scope="module")
def trace(ckpt):
    logger = ExpertCache(L * E, log_accesses=True)
    _run(q3lab.load(ckpt, experts=logger))
    return logger.trace()


def test_simulator_reproduces_the_live_lru_cache_of_a_3_layer_model(ckpt):
    """The issue's case: at 9f7e29a this cache hit 9 times live and 0 times in the simulator (its access log
    had no groups, so the simulator did not protect a layer call's experts)."""
    cache = ExpertCache(7, policy="lru", log_accesses=True)
    _run(q3lab.load(ckpt, experts=cache))
    live = cache.summary()
    sim = simulate(cache.access_log(), [7], policies=["lru"]).iloc[0]
    assert live["hits"] > 0
    assert (sim["accesses"], sim["hits"], sim["misses"]) == (live["accesses"], live["hits"], live["misses"])
