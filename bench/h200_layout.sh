#!/usr/bin/env bash
# The layout branch on an H200: every module imports (new paths, and the old ones forward with one warning),
# the layering test, and the GPU tests (Triton kernels against their torch twins, the fast decoders, recording)
# on the moved modules. Writes $OUT/layout_*.txt and prints a summary. About 2-4 minutes.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD
python - > "$OUT/layout_imports.txt" 2>&1 <<'PY'
import importlib, pkgutil, warnings
import q3lab
from q3lab._compat import MOVED
bad = []
for m in pkgutil.walk_packages(q3lab.__path__, "q3lab."):
    if m.name.endswith("__main__"):
        continue  # runs the CLI
    try:
        importlib.import_module(m.name)
    except Exception as e:  # noqa: BLE001 (report every failure)
        bad.append(f"{m.name}: {type(e).__name__}: {e}")
for old, new in MOVED.items():
    if importlib.util.find_spec(new) is None:
        continue
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = importlib.import_module(old)
    if got is not importlib.import_module(new) and old != new.rpartition(".")[0]:
        bad.append(f"{old} does not forward to {new}")
import torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = None
print("torch", torch.__version__, "triton", tv, "cuda", torch.cuda.is_available())
print("IMPORT FAILURES:", len(bad)); print("\n".join(bad))
PY
tail -3 "$OUT/layout_imports.txt"
timeout 120 python -m pytest -q -p no:cacheprovider tests/test_layout.py > "$OUT/layout_test_layout.txt" 2>&1
echo "test_layout: $(tail -1 "$OUT/layout_test_layout.txt")"
timeout 300 python -m pytest -q -p no:cacheprovider tests/gpu > "$OUT/layout_gpu_tests.txt" 2>&1
echo "tests/gpu: $(tail -1 "$OUT/layout_gpu_tests.txt")"
grep -E "^(FAILED|ERROR)" "$OUT/layout_gpu_tests.txt" | head -20
