"""The old flat module paths (`q3lab.model`, `q3lab.fastdecode`, ...), forwarded for one release.

`MOVED` is the one table of the package's layout change: old module -> new module. `scripts/relayout.py`
reads it (with `ast`, without importing q3lab) to move files and rewrite imports; `install()` (called by
`q3lab/__init__.py`) puts a finder on `sys.meta_path` so that importing an old path returns the new module
itself (the same objects, so monkeypatching through either name patches the one module) and emits one
DeprecationWarning naming the new path.
"""
# relayout: skip (this file holds the old names on purpose)
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys
import types
import warnings

MOVED = {
    # base: bytes to validated values
    "q3lab.config": "q3lab.base.config",
    "q3lab.safetensors_io": "q3lab.base.safetensors_io",
    "q3lab.jsonio": "q3lab.base.jsonio",
    "q3lab.tokenizer": "q3lab.base.tokenizer",
    # weights: sources on disk, behind one interface; everything that writes files
    "q3lab.weights": "q3lab.weights.source",
    "q3lab.checkpoint": "q3lab.weights.checkpoint",
    "q3lab.store": "q3lab.weights.store",
    "q3lab.outdir": "q3lab.weights.outdir",
    "q3lab.extract": "q3lab.weights.extraction",
    "q3lab.synth": "q3lab.weights.synthetic",
    "q3lab.llamacpp": "q3lab.weights.gguf",
    "q3lab.inventory": "q3lab.weights.inventory",
    # kernels: the kernel sets the step runs (Triton and C), each with a torch twin; the runtime's layer
    "q3lab.decode_kernels": "q3lab.kernels.triton_decode",
    "q3lab.moe_kernels": "q3lab.kernels.triton_moe",
    "q3lab.grouped_moe": "q3lab.kernels.grouped_moe",
    "q3lab.cpu_kernels": "q3lab.kernels.cpu",
    # runtime: the model as a specification, its one layer step, experts, residency, recording
    "q3lab.model": "q3lab.runtime.thinker",
    "q3lab.step": "q3lab.runtime.step",
    "q3lab.experts": "q3lab.runtime.experts",
    "q3lab.policies": "q3lab.runtime.residency",
    "q3lab.finite": "q3lab.runtime.finite",
    "q3lab.record": "q3lab.runtime.recording",
    # fast: drivers of the same step with fixed shapes (graphs, offload), the GPU expert cache
    "q3lab.fastdecode": "q3lab.fast.decoders",
    "q3lab.device_cache": "q3lab.fast.device_cache",
    "q3lab.host_experts": "q3lab.fast.host_experts",
    "q3lab.offload": "q3lab.fast.offload",
    # oracle: transformers' own thinker on the same tensors
    "q3lab.reference": "q3lab.oracle",
    # analysis: frames from models and traces
    "q3lab.metrics": "q3lab.analysis.metrics",
    "q3lab.cachesim": "q3lab.analysis.cachesim",
    "q3lab.replay": "q3lab.analysis.replay",
    "q3lab.lens": "q3lab.analysis.lens",
    "q3lab.interventions": "q3lab.analysis.interventions",
    "q3lab.causal": "q3lab.analysis.causal",
    "q3lab.saturation": "q3lab.analysis.saturation",
    "q3lab.study": "q3lab.analysis.study",
    "q3lab.ablations": "q3lab.analysis.ablations",
    "q3lab.ranking": "q3lab.analysis.ranking",
    "q3lab.rope_check": "q3lab.analysis.rope_check",
    # viz: figures, the explorer, the notebook runner and helpers
    "q3lab.plots": "q3lab.viz.plots",
    "q3lab.plots_causal": "q3lab.viz.plots_causal",
    "q3lab.plots_model": "q3lab.viz.plots_model",
    "q3lab.explorer": "q3lab.viz.interactive",
    "q3lab.notebooks": "q3lab.viz.notebooks",
}

# Old module names that are also public functions of the package (`q3lab.record(model)`): the function wins.
SHADOWED = ("record", "extract", "synth")

# Old module paths that the issues name as public API (`q3lab.cachesim.simulate(...)`, `q3lab.causal`,
# `q3lab.saturation.router_saturation`): a contract other code is written against, so they stay, as
# aliases of the new modules, without a warning.
STABLE = ("q3lab.cachesim", "q3lab.causal", "q3lab.saturation")


class _Alias(importlib.abc.Loader):
    """Loads an old path as the new module itself, warning once (the import system caches the result), except
    for the STABLE paths."""

    def __init__(self, new: str):
        self.new = new

    def create_module(self, spec):
        if spec.name not in STABLE:
            warnings.warn(f"{spec.name} is deprecated (the package was laid out by layer): import {self.new}",
                          DeprecationWarning, stacklevel=2)
        return importlib.import_module(self.new)

    def exec_module(self, module) -> None:
        pass  # the new module is already executed


class _Finder(importlib.abc.MetaPathFinder):
    """Finds the old module paths of MOVED (only those without a real module of the same name)."""

    def find_spec(self, fullname, path=None, target=None):
        new = MOVED.get(fullname)
        if new is None or fullname == new.rsplit(".", 1)[0]:
            return None  # not an old path, or an old module that is now a real package (q3lab.weights)
        leaf = fullname.rsplit(".", 1)[1]
        if any(os.path.exists(os.path.join(p, leaf + ".py")) for p in path or ()):
            return None  # a tree not yet laid out (scripts/relayout.py not run): the real module wins
        return importlib.util.spec_from_loader(fullname, _Alias(new))


class _Package(types.ModuleType):
    """`q3lab` itself: refuses to let an old module path rebind a public function of the same name."""

    def __setattr__(self, name: str, value) -> None:
        # After importing `q3lab.record` (the old path) the import system sets `q3lab.record` to that module;
        # `q3lab.record` must stay the function, and `__getattr__` resolves it when it is not bound yet.
        if name in SHADOWED and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


def install(package: types.ModuleType) -> None:
    """Serve the old module paths from now on (idempotent)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        # First: an editable install's finder would otherwise serve `q3lab.model` from another checkout.
        sys.meta_path.insert(0, _Finder())
    package.__class__ = _Package


def forward_getattr(package: str, old_module: str):
    """A module `__getattr__` for a package that replaced an old module of its name (`q3lab.weights`).

    `from q3lab.weights import open_source` keeps working: the name comes from the new module, with one
    DeprecationWarning per name.
    """
    new = MOVED[old_module]

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        module = importlib.import_module(new)
        try:
            value = getattr(module, name)
        except AttributeError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        warnings.warn(f"{package}.{name} is deprecated (the package was laid out by layer): "
                      f"use {new}.{name}", DeprecationWarning, stacklevel=2)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
