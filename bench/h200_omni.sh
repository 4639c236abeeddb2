#!/usr/bin/env bash
# The omni helper's H200 run (issue 22): q3lab's multimodal thinker against transformers on CUDA (the tiny random
# full Qwen3-Omni), then tests/test_omni.py on the machine's transformers version. About a minute.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
OUT=${OUT:-/tmp/omni_out}
mkdir -p "$OUT"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
python -c "import PIL; print('Pillow', PIL.__version__)" || echo "Pillow missing: image inputs cannot be built here"
timeout 240 python bench/omni_cuda.py --out "$OUT" 2>&1 | grep -v -E "Loading weights|Writing model" | tee "$OUT/omni_cuda.txt"
echo "omni_cuda rc=${PIPESTATUS[0]}"
timeout 240 python -m pytest -q -x -p no:cacheprovider tests/test_omni.py 2>&1 | tail -25 | tee "$OUT/test_omni.txt"
echo "test_omni rc=${PIPESTATUS[0]}"
