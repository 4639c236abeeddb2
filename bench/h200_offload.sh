#!/usr/bin/env bash
# The offload helper's H200 run (issue 19): CUDA tests, then every row of bench/gpu_offload.py. <= 7 minutes.
# From the root of a copy of the worktree; results under $OUT.
set -u
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
lscpu | grep -E "Model name|^CPU\(s\)|Thread|Flags" | cut -c1-300 | tee "$OUT/cpu.txt" | head -4
date -u
timeout 80 python -m pytest -q -x tests/gpu/test_offload_gpu.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
timeout 370 python bench/gpu_offload.py --out "$OUT" 2>&1 | tee "$OUT/gpu_offload_log.txt"
echo "exit ${PIPESTATUS[0]}"
date -u
