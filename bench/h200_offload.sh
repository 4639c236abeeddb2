#!/usr/bin/env bash
# The offload helper's H200 run (issue 19): the C host kernels built and timed, CUDA tests, then every row of
# bench/gpu_offload.py with the per-phase profile. <= 7 minutes. From the root of a copy of the worktree;
# results under $OUT.
set -u
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
export Q3LAB_KERNEL_DIR=${Q3LAB_KERNEL_DIR:-/tmp/q3lab_kernels}
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
lscpu | grep -E "Model name|^CPU\(s\)|Thread|Flags" | cut -c1-300 | tee "$OUT/cpu.txt" | head -4
lscpu | grep -o -w -E "avx512f|avx512bw|avx512_bf16|amx_bf16" | sort -u | tr '\n' ' '; echo
date -u
# the C kernels build here (a failure prints the compiler's message; the bench would then run the torch twin)
timeout 20 python -c "from q3lab.kernels import cpu; print('q3lab.kernels.cpu:', cpu.isa())" 2>&1 | tail -5 | tee "$OUT/cpu_kernels.txt"
timeout 60 python -m pytest -q tests/gpu/test_offload_gpu.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
timeout 325 python bench/gpu_offload.py --out "$OUT" 2>&1 | tee "$OUT/gpu_offload_log.txt"
echo "exit ${PIPESTATUS[0]}"
date -u
