#!/usr/bin/env bash
# The gpudecode helper's H200 run (issue 15, goals 1-2): the decode rows of bench/gpu_decode.py with the MoE sweep,
# the LAYER kernels' sweeps and a kernel profile of each decoder, then the GPU tests. Results under $OUT.
# Run from the root of a copy of the worktree; at most ~7 minutes wall (each part under a timeout).
set -u
OUT=${OUT:-/tmp/h200_gpudecode}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
echo "# $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
nvidia-smi --query-gpu=name,memory.total,clocks.max.mem --format=csv,noheader 2>/dev/null
t0=$(date +%s)
OUT="$OUT" timeout 280 python3 bench/gpu_decode.py --rows decode --skip-reference --sweep --profile \
    --json "$OUT/gpu_decode.json" > "$OUT/gpu_decode_log.txt" 2>&1
echo "bench rc=$? in $(( $(date +%s) - t0 )) s"
grep -vE "^\s*$|Warning|warn\(" "$OUT/gpu_decode_log.txt" | cut -c1-300 | tail -400
t1=$(date +%s)
left=$(( 410 - (t1 - t0) ))
[ "$left" -lt 30 ] && left=30
timeout "$left" python3 -m pytest -q -p no:cacheprovider tests/gpu > "$OUT/gpu_tests.txt" 2>&1
echo "tests/gpu rc=$? in $(( $(date +%s) - t1 )) s (limit $left s):"
grep -E "passed|failed|FAILED|ERROR|Error|assert" "$OUT/gpu_tests.txt" | cut -c1-300 | tail -30
