"""Weights layer: a checkpoint folder or an extracted store behind one interface, and every file q3lab writes.

`source` (open_source: the one way in, with the audit gate; WeightSource), `checkpoint` (Checkpoint, the shard
IO, the audit), `store` (the extracted store, atomic writes), `extraction` (extract, verify), `synthetic`
(synth), `gguf` (export_gguf for llama.cpp), `inventory` (checkpoint tables), `outdir` (output folders
claimed with a marker). Imports only `base`.
"""
from __future__ import annotations

from q3lab._compat import forward_getattr

# This package replaced the flat module of its name (now `source`): its names still resolve, with a warning.
__getattr__ = forward_getattr(__name__, __name__)
