#!/usr/bin/env bash
# Issue 15 goal 3 (this branch: a CUDA graph per prefill bucket), on one H200 in <= 7 minutes. Run from the root of
# a copy of the worktree. Under $OUT: this script's log, the bench's JSON, the kernel profiles in one file and the
# GPU tests' output (the device returns at most 8 files). Each step has its own time limit; a failing step does not
# stop the next (the bench also catches a failing row and goes on, saving its JSON after every row).
set -u
OUT=${OUT:-/tmp/h200_prefill}
mkdir -p "$OUT"
exec > >(tee "$OUT/h200_prefill_log.txt") 2>&1
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 Q3LAB_PROFILE_DIR=/tmp/prefill_profiles
PY=${PY:-python3}
t0=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - t0 )) s] $*"; }
left() { local l=$(( 410 - ($(date +%s) - t0) )); [ "$l" -lt 10 ] && l=10; echo "$l"; }

step "environment"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
git log --oneline -1 2>/dev/null || true

step "GPU tests of the graphed prefill (tests/gpu/test_gpu_prefill_graphs.py)"
timeout 150 $PY -m pytest -q -p no:cacheprovider -rA tests/gpu/test_gpu_prefill_graphs.py > "$OUT/gpu_tests.txt" 2>&1
echo "rc=$?"
grep -E "passed|failed|PASSED|FAILED|Error|assert|bf16 T=" "$OUT/gpu_tests.txt" | grep -v "warn" | tail -40

step "gpu_decode.py --rows prefill --skip-reference --profile"
rm -rf /tmp/prefill_profiles
timeout 220 $PY bench/gpu_decode.py --rows prefill --skip-reference --profile --new-tokens 8 \
    --json "$OUT/gpu_decode_prefill.json" 2>&1 | grep -v "warnings.warn\|DeprecationWarning"
echo "rc=${PIPESTATUS[0]}"
for f in /tmp/prefill_profiles/profile_prefill*.txt; do
    [ -f "$f" ] && { echo "##### $(basename "$f")"; cat "$f"; echo; }
done > "$OUT/prefill_profiles.txt"
ls -la "$OUT"

step "summary: the prefill rows and profiles"
$PY - "$OUT/gpu_decode_prefill.json" <<'PYEOF'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as e:
    sys.exit(f"no JSON: {e}")
import pandas as pd
rows = [x for x in r["rows"] if str(x.get("system", "")).startswith("prefill")]
cols = ["system", "prefill_ms", "tok_s", "speedup_vs_transformers", "compute_floor_ms", "of_floor",
        "bytes_floor_ms", "of_bytes_floor", "last_logits_rel_diff", "capture_s", "graph_pool_GB"]
df = pd.DataFrame(rows)
pd.set_option("display.width", 250)
print(df[[c for c in cols if c in df]].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
print(pd.DataFrame(r.get("prefill_profiles", {})).T.to_string(float_format=lambda v: f"{v:.3f}"))
print("failed rows:", r.get("failed_rows"))
PYEOF

step "the other GPU tests (regression check of the shared changes: Thinker._forward, _rope_table, moe_torch)"
timeout "$(left)" $PY -m pytest -q -p no:cacheprovider tests/gpu --ignore=tests/gpu/test_gpu_prefill_graphs.py \
    > "$OUT/gpu_tests_others.txt" 2>&1
echo "rc=$?"
grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests_others.txt" | grep -v warn | tail -25
step "done"
