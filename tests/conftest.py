"""Shared fixtures: synthetic checkpoints (q3lab.synth), built once per session where they are only read."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# tokenizers warns (and may deadlock) when a process forks after it used its thread pool.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A tiny synthetic checkpoint (seed 0, bf16, with stubs). Shared: do not modify it; use `make_ckpt`."""
    from q3lab.weights.synthetic import synth
    return synth(tmp_path_factory.mktemp("tiny_ckpt") / "ckpt", "tiny", seed=0, progress=False)


@pytest.fixture
def make_ckpt(tmp_path):
    """Factory for a fresh synthetic checkpoint in this test's tmp_path: make_ckpt(preset="tiny", **kw)."""
    from q3lab.weights.synthetic import synth
    count = iter(range(1000))

    def make(preset: str = "tiny", **kw) -> Path:
        kw.setdefault("progress", False)
        return synth(tmp_path / f"ckpt{next(count)}", preset, **kw)
    return make
