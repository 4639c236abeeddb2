"""The package layout: layers import only downwards, the tree uses no old module path, and the old paths
still import (the same module, one DeprecationWarning) for one release."""
# relayout: skip (this file names the old module paths on purpose)
from __future__ import annotations

import ast
import importlib
import importlib.util
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import q3lab
from q3lab._compat import MOVED, STABLE

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "q3lab"

# Low to high. A module may import any module of its own layer or of a lower one, never a higher one (lazy
# imports inside functions included). Groups are subpackages or top-level modules; the figures of atlas and
# omni sit with viz. kernels, runtime and omni are one layer: the step picks a kernel set whose torch twins
# reuse the step's math, and the thinker runs omni's towers while omni's inputs feed the recorder.
LAYERS = [
    {"errors", "_compat", "_lazy"},
    {"base"},
    {"weights"},
    {"runtime", "kernels", "omni"},
    {"fast"},
    {"oracle"},
    {"analysis"},
    {"atlas"},
    {"viz", "atlas.plots", "omni.plots"},
    {"cli"},
    {"__main__", "__init__"},
]
RANK = {g: i for i, layer in enumerate(LAYERS) for g in layer}


def group(module: str) -> str:
    """'q3lab.runtime.thinker' -> 'runtime', 'q3lab.atlas.plots' -> 'atlas.plots', 'q3lab' -> '__init__'."""
    parts = module.split(".")[1:]
    if not parts:
        return "__init__"
    if parts[:2] in (["atlas", "plots"], ["omni", "plots"]):
        return ".".join(parts[:2])
    return parts[0]


def module_of(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def top_exports() -> dict[str, str]:
    """q3lab/__init__.py's `_EXPORTS`: public name -> module, so `from q3lab import load` counts as runtime."""
    for node in ast.parse((PKG / "__init__.py").read_text()).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "_EXPORTS":
            return {k: f"q3lab.{v}" for k, v in ast.literal_eval(node.value).items()}
    raise AssertionError("q3lab/__init__.py has no _EXPORTS")


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported q3lab module) for every import in the file, function-level ones included."""
    exports = top_exports()
    mod = module_of(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "q3lab"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "q3lab":
                continue
            if target == "q3lab":  # `from q3lab import X`: a subpackage/module, or a public name
                out += [(node.lineno, exports.get(a.name, f"q3lab.{a.name}")) for a in node.names]
            else:
                out.append((node.lineno, target))
    return out


def test_every_group_has_a_layer():
    groups = {group(module_of(p)) for p in PKG.rglob("*.py")}
    missing = sorted(groups - set(RANK))
    assert not missing, f"give these parts of q3lab a layer in tests/test_layout.py LAYERS: {missing}"


def test_layers_import_only_downwards():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        me = group(module_of(path))
        for line, target in imports(path):
            them = group(target)
            if RANK.get(them, len(LAYERS)) > RANK[me]:
                bad.append(f"{path.relative_to(ROOT)}:{line} ({me}) imports {target} ({them})")
    assert not bad, "imports that run up the layers:\n" + "\n".join(bad)


def test_no_module_is_named_like_the_function_it_exports():
    clash = []
    for path in sorted(PKG.rglob("*.py")):
        if path.name.startswith("_"):
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == path.stem:
                clash.append(f"{path.relative_to(ROOT)} defines {node.name}")
    assert not clash, clash


def test_the_tree_uses_no_old_module_path():
    """scripts/relayout.py has nothing left to do: no file imports or names an old flat module path."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "relayout.py"), "--dry-run", "--root", str(ROOT)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("(nothing to do)"), r.stdout


def test_packaging_finds_every_subpackage():
    """pyproject's setuptools `find` includes every folder of q3lab that holds modules."""
    setuptools = pytest.importorskip("setuptools")
    found = set(setuptools.find_packages(str(ROOT), include=["q3lab", "q3lab.*"]))
    folders = {module_of(p.parent / "__init__.py") for p in PKG.rglob("*.py")}
    assert folders <= found, sorted(folders - found)
    assert 'include = ["q3lab", "q3lab.*"]' in (ROOT / "pyproject.toml").read_text()


def _fresh(name: str) -> None:
    sys.modules.pop(name, None)


@pytest.mark.parametrize("old", sorted(set(MOVED) - set(STABLE)))
def test_old_module_path_forwards_with_one_warning(old):
    new = MOVED[old]
    if importlib.util.find_spec(new) is None:
        pytest.skip(f"{new} is not on this branch")
    target = importlib.import_module(new)
    if old == new.rpartition(".")[0]:  # q3lab.weights: the package replaced the module; see the next test
        return
    _fresh(old)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = importlib.import_module(old)
        again = importlib.import_module(old)
    assert got is target and again is target
    dep = [w for w in caught if issubclass(w.category, DeprecationWarning)]
    assert len(dep) == 1, [str(w.message) for w in dep]
    assert new in str(dep[0].message) and old in str(dep[0].message)


@pytest.mark.parametrize("old", STABLE)
def test_module_paths_the_issues_name_are_stable(old):
    """`q3lab.cachesim`, `q3lab.causal`, `q3lab.saturation` are public API (issues 14, 17, 18): they import as
    the new module, with no warning."""
    target = importlib.import_module(MOVED[old])
    _fresh(old)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = importlib.import_module(old)
    assert got is target
    assert [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)] == []


def test_old_weights_module_names_forward_from_the_package():
    from q3lab.weights import source
    sys.modules["q3lab.weights"].__dict__.pop("open_weights", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from q3lab.weights import open_weights
    assert open_weights is source.open_weights
    assert [str(w.message) for w in caught] == [
        "q3lab.weights.open_weights is deprecated (the package was laid out by layer): "
        "use q3lab.weights.source.open_weights"]
    with pytest.raises(ImportError):
        from q3lab.weights import no_such_name  # noqa: F401


def test_public_functions_survive_their_old_module_paths():
    """`q3lab.record`, `q3lab.extract`, `q3lab.synth` are functions, also after importing the old module path."""
    from q3lab.runtime.recording import record
    from q3lab.weights.extraction import extract
    from q3lab.weights.synthetic import synth
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in ("q3lab.record", "q3lab.extract", "q3lab.synth"):
            _fresh(name)
            importlib.import_module(name)
        from q3lab.record import Recorder  # noqa: F401
    assert (q3lab.record, q3lab.extract, q3lab.synth) == (record, extract, synth)


def test_new_paths_import_without_warnings():
    code = ("import warnings; warnings.simplefilter('error')\n"
            "import q3lab, q3lab.atlas, q3lab.runtime.thinker, q3lab.analysis.metrics, q3lab.viz.plots, q3lab.fast.decoders\n"
            "from q3lab.weights import source, store\n"
            "assert callable(q3lab.record) and callable(q3lab.load) and callable(q3lab.atlas.layer_summary)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
