#!/usr/bin/env bash
# The lead's final H200 runs on the merged tree, in two device calls (each under 600 s), from the repository root:
#   bash bench/h200_final.sh decode    # tests/gpu, then every row of bench/gpu_decode.py (issue 15) with profiles
#   bash bench/h200_final.sh offload   # bench/probe_residency.py, then every row of bench/gpu_offload.py (issue 19)
# Logs, JSON and profiles under $OUT (tarred: the device returns only a few files).
set -u
OUT=${OUT:-/tmp/h200_final}
mkdir -p "$OUT/r"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 Q3LAB_PROFILE_DIR=$OUT/r/profiles Q3LAB_KERNEL_DIR=/tmp/q3lab_kernels
t0=$(date +%s)
echo "# $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null || echo '?') $(nvidia-smi --query-gpu=name --format=csv,noheader)"
case "${1:-decode}" in
decode)
    timeout 170 python3 -m pytest -q -p no:cacheprovider tests/gpu > "$OUT/r/gpu_tests.txt" 2>&1
    echo "tests/gpu rc=$? in $(( $(date +%s) - t0 )) s"; tail -3 "$OUT/r/gpu_tests.txt"
    grep -E "^FAILED|^ERROR" "$OUT/r/gpu_tests.txt" | head -20
    left=$(( 585 - ($(date +%s) - t0) ))
    timeout "$left" python3 bench/gpu_decode.py --rows decode,prefill,batch,traced --profile \
        --json "$OUT/r/gpu_decode.json" > "$OUT/r/gpu_decode_log.txt" 2>&1
    echo "gpu_decode rc=$? in $(( $(date +%s) - t0 )) s"
    grep -E "^\s*(system|floor|prefill|batch|traced|q3lab|transformers)|tok_s|profile " "$OUT/r/gpu_decode_log.txt" \
        | grep -v "^{" | cut -c1-260 | tail -45
    ;;
offload)
    timeout 60 python3 bench/probe_residency.py 2>&1 | tee "$OUT/r/probe_residency.txt"
    left=$(( 585 - ($(date +%s) - t0) ))
    timeout "$left" python3 bench/gpu_offload.py --out "$OUT/r" > "$OUT/r/gpu_offload_log.txt" 2>&1
    echo "gpu_offload rc=$? in $(( $(date +%s) - t0 )) s"
    grep -E "^routing=|phases|probe|host " "$OUT/r/gpu_offload_log.txt" | cut -c1-260 | tail -60
    ;;
esac
tar czf "$OUT/results.tgz" -C "$OUT" r && rm -rf "$OUT/r"
