"""q3lab: read, run and study the Qwen3-Omni thinker on machines that cannot hold all of it.

The package is laid out by layer, each importing only those below it (docs/DESIGN.md, tests/test_layout.py):
`base` (bytes to values), `weights` (sources on disk, every file written), `kernels` (leaf arithmetic),
`runtime` (the model, its one layer step, experts, residency, recording), `fast` (graph and offloaded
drivers of that step), `oracle` (transformers on the same tensors), `analysis` and `atlas` (tidy frames),
`viz` (figures, notebooks), and the CLI on top.
"""
from __future__ import annotations

import sys

from q3lab import _compat
from q3lab._lazy import lazy_exports

__version__ = "0.1.0"

# The flat module paths of before the layout still import, with a DeprecationWarning, for one release.
_compat.install(sys.modules[__name__])

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)

# These functions share their module's name. Importing the submodule (`import q3lab.extract`) sets the
# package attribute to the module, and __getattr__ is then never asked: bind the functions eagerly instead.
from q3lab.weights.extraction import extract  # noqa: E402
from q3lab.runtime.recording import record  # noqa: E402
from q3lab.weights.synthetic import synth  # noqa: E402
