#!/usr/bin/env bash
# Issue 15 goals 3-5 + issue 16's H200 trace row, on one H200 in <= 7 minutes. Run from the root of a copy of the
# worktree; every log and JSON goes under $OUT. Each step has its own time limit and a failing step does not stop
# the next one (the benches also catch a failing row and go on, saving their JSON after every row).
set -u
OUT=${OUT:-/tmp/h200_gpuprefill}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
PY=${PY:-python3}
t0=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - t0 )) s] $*"; }

step "environment"
$PY - <<'PYEOF' 2>&1 | tee "$OUT/env.txt"
import torch, torch.nn.functional as F, transformers
print("torch", torch.__version__, "transformers", transformers.__version__, torch.cuda.get_device_name())
print("torch._grouped_mm", hasattr(torch, "_grouped_mm"), "F.grouped_mm", hasattr(F, "grouped_mm"))
from q3lab import grouped_moe as gm
E, I, D, A, N = 128, 768, 2048, 8, 4096        # the real expert shape, transformers' fused layout
g = torch.Generator(device="cuda").manual_seed(0)
gu = (torch.randn(E, 2 * I, D, device="cuda", generator=g) * 0.02).bfloat16()
dn = (torch.randn(E, D, I, device="cuda", generator=g) * 0.02).bfloat16()
h = torch.randn(N, D, device="cuda", generator=g).bfloat16()
ids = torch.rand(N, E, device="cuda", generator=g).topk(A, -1).indices
w = torch.softmax(torch.randn(N, A, device="cuda", generator=g), -1).bfloat16()
try:
    a = gm.moe_grouped(h, ids, w, gu[:, :I], gu[:, I:], dn)
    b = gm.moe_grouped_torch(h, ids, w, gu[:, :I], gu[:, I:], dn)
    print("moe_grouped vs twin at the real shape, N=4096: rel", ((a - b).norm() / b.norm()).item())
    import time
    for fn, name in ((gm.moe_grouped, "grouped_mm"), (gm.moe_grouped_torch, "twin loop")):
        fn(h, ids, w, gu[:, :I], gu[:, I:], dn); torch.cuda.synchronize(); t = time.perf_counter()
        for _ in range(5):
            fn(h, ids, w, gu[:, :I], gu[:, I:], dn)
        torch.cuda.synchronize(); s = (time.perf_counter() - t) / 5
        print(f"  {name}: {s * 1e3:.2f} ms per layer, {2 * N * A * 3 * I * D / s / 1e12:.0f} TFLOP/s")
except Exception as e:
    import traceback; traceback.print_exc()
PYEOF

step "GPU tests"
timeout 100 $PY -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/gpu_tests.txt" | tail -40

step "gpu_decode.py --rows prefill,batch,traced"
timeout 220 $PY bench/gpu_decode.py --rows prefill,batch,traced --new-tokens 16 --profile \
    --json "$OUT/gpu_decode_prefill.json" 2>&1 | tee "$OUT/gpu_decode_prefill_log.txt" | grep -v "^ *warnings.warn"

step "trace_throughput.py trace --synthetic full --device cuda"
timeout 75 $PY bench/trace_throughput.py trace --synthetic full --device cuda --tokens 16384 --batch-size 16 \
    --window 512 --repeats 2 --keep "$OUT/atlas" --json "$OUT/trace_throughput.json" 2>&1 \
    | tee "$OUT/trace_throughput_log.txt" | tail -25

step "done"
