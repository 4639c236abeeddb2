"""q3lab: read, run and study the Qwen3-Omni thinker on machines that cannot hold all of it."""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public names, resolved lazily so that `import q3lab` stays cheap (no pandas/matplotlib until needed).
_EXPORTS = {
    "Q3LabError": "errors", "CheckpointError": "errors", "StoreError": "errors", "InputError": "errors",
    "ThinkerConfig": "config",
    "Checkpoint": "checkpoint", "audit": "checkpoint", "audit_checkpoint": "checkpoint",
    "Store": "store", "open_weights": "weights", "open_source": "weights", "WeightSource": "weights",
    "extract": "extract", "verify": "extract",
    "synth": "synth",
    "load_tokenizer": "tokenizer",
    "Thinker": "model", "KVCache": "model", "load": "model",
    "ResidentExperts": "experts", "ExpertCache": "experts",
    "record": "record",
    "intervene": "interventions", "capture": "interventions",
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
from .extract import extract  # noqa: E402
from .record import record  # noqa: E402
from .synth import synth  # noqa: E402
