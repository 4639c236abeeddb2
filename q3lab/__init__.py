"""q3lab: read, run and study the Qwen3-Omni thinker on machines that cannot hold all of it."""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public names, resolved lazily so that `import q3lab` stays cheap (no pandas/matplotlib until needed).
_EXPORTS = {
    "Q3LabError": "errors", "CheckpointError": "errors", "StoreError": "errors", "InputError": "errors",
    "ThinkerConfig": "base.config",
    "Checkpoint": "weights.checkpoint", "audit": "weights.checkpoint", "audit_checkpoint": "weights.checkpoint",
    "Store": "weights.store", "open_weights": "weights.source", "open_source": "weights.source", "WeightSource": "weights.source",
    "extract": "weights.extraction", "verify": "weights.extraction",
    "synth": "weights.synthetic",
    "load_tokenizer": "base.tokenizer",
    "Thinker": "runtime.thinker", "KVCache": "runtime.thinker", "load": "runtime.thinker",
    "ResidentExperts": "runtime.experts", "ExpertCache": "runtime.experts",
    "record": "runtime.recording",
    "intervene": "analysis.interventions", "capture": "analysis.interventions",
}


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'q3lab' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = list(_EXPORTS)

# These functions share their module's name. Importing the submodule (`import q3lab.extract`) sets the
# package attribute to the module, and __getattr__ is then never asked: bind the functions eagerly instead.
from q3lab.weights.extraction import extract  # noqa: E402
from q3lab.runtime.recording import record  # noqa: E402
from q3lab.weights.synthetic import synth  # noqa: E402
