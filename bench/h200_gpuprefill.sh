#!/usr/bin/env bash
# Issue 15 goals 3-5 + issue 16's H200 trace row, on one H200 in <= 7 minutes. Run from the root of a copy of the
# worktree. Under $OUT exactly three files: this script's whole log and the two benches' JSON (the device returns
# only a few files: profiles and the traced dataset stay in /tmp, their summaries are printed). Each step has its
# own time limit; a failing step does not stop the next (the benches also catch a failing row and go on, saving
# their JSON after every row).
set -u
OUT=${OUT:-/tmp/h200_gpuprefill}
mkdir -p "$OUT"
exec > >(tee "$OUT/h200_gpuprefill_log.txt") 2>&1
export PYTHONPATH=$PWD Q3LAB_PROFILE_DIR=/tmp/gpuprefill_profiles
PY=${PY:-python3}
t0=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - t0 )) s] $*"; }

step "environment + grouped GEMM at the real expert shape"
$PY - <<'PYEOF'
import torch, torch.nn.functional as F, transformers
print("torch", torch.__version__, "transformers", transformers.__version__, torch.cuda.get_device_name())
print("torch._grouped_mm", hasattr(torch, "_grouped_mm"), "F.grouped_mm", hasattr(F, "grouped_mm"))
import time
from q3lab import grouped_moe as gm
E, I, D, A = 128, 768, 2048, 8                  # the real expert shape, transformers' fused layout
g = torch.Generator(device="cuda").manual_seed(0)
gu = (torch.randn(E, 2 * I, D, device="cuda", generator=g) * 0.02).bfloat16()
dn = (torch.randn(E, D, I, device="cuda", generator=g) * 0.02).bfloat16()
for N in (64, 4096):
    h = torch.randn(N, D, device="cuda", generator=g).bfloat16()
    ids = torch.rand(N, E, device="cuda", generator=g).topk(A, -1).indices      # uniform routing
    w = torch.softmax(torch.randn(N, A, device="cuda", generator=g), -1).bfloat16()
    args = (h, ids, w, gu[:, :I], gu[:, I:], dn)
    try:
        a, b = gm.moe_grouped(*args), gm.moe_grouped_torch(*args)
        print(f"N={N}: moe_grouped vs twin rel {((a - b).norm() / b.norm()).item():.1e}; moe_grouped_sum vs twin "
              f"rel {((gm.moe_grouped_sum(*args).float() - b.sum(1)).norm() / b.sum(1).norm()).item():.1e}")
        for fn in (gm.moe_grouped, gm.moe_grouped_sum, gm.moe_grouped_torch):
            fn(*args); torch.cuda.synchronize(); t = time.perf_counter()
            for _ in range(5):
                fn(*args)
            torch.cuda.synchronize(); s = (time.perf_counter() - t) / 5
            print(f"  {fn.__name__}: {s * 1e3:.3f} ms per layer = {2 * N * A * 3 * I * D / s / 1e12:.0f} TFLOP/s")
    except Exception:
        import traceback; traceback.print_exc()
PYEOF

step "GPU tests"
timeout 100 $PY -m pytest -q -p no:cacheprovider tests/gpu > /tmp/gpuprefill_tests.txt 2>&1
grep -E "passed|failed|Error|error|assert|FAILED" /tmp/gpuprefill_tests.txt | grep -v "warn" | tail -40

step "gpu_decode.py --rows prefill,batch,traced"
timeout 215 $PY bench/gpu_decode.py --rows prefill,batch,traced --new-tokens 16 --profile \
    --json "$OUT/gpu_decode_prefill.json" 2>&1 | grep -v "warnings.warn\|DeprecationWarning"

step "trace_throughput.py trace --synthetic full --device cuda"
timeout 75 $PY bench/trace_throughput.py trace --synthetic full --device cuda --tokens 16384 --batch-size 16 \
    --window 512 --repeats 2 --keep /tmp/gpuprefill_atlas --json "$OUT/trace_throughput.json" 2>&1 | tail -20

step "GPU tests (again, the summary)"
tail -3 /tmp/gpuprefill_tests.txt
step "done"
