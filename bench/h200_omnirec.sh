#!/usr/bin/env bash
# omnirec on an H200 (torch 2.11, transformers 5.17): the modality tests under the older transformers, and one
# multimodal recording of the tiny random full Qwen3-Omni on CUDA, its modality column and experts checked
# against the same recording on CPU. Writes $OUT/omnirec.txt; about a minute.
set -u
OUT=${OUT:-out/h200_omnirec}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
{
  python -c "import soundfile, PIL" 2>/dev/null || echo "!! soundfile or Pillow missing here: the media tests will fail"
  # data/omni_inputs is not among the copied folders: remake it (deterministic, a few KB)
  [ -f data/omni_inputs/tone.wav ] || python scripts/make_omni_inputs.py
  echo "== pytest tests/test_modality.py (transformers $(python -c 'import transformers; print(transformers.__version__)'))"
  python -m pytest -q -p no:cacheprovider tests/test_modality.py 2>&1 | tail -15
  echo "== CUDA vs CPU recording of the tiny omni model"
  python - <<'PY'
import tempfile, numpy as np, torch, q3lab
from q3lab.omni.inputs import OmniSpec
from q3lab.omni.modality import read_media, record_media
from q3lab.omni.synthetic import tiny_omni_checkpoint
from q3lab import metrics as M
path = tiny_omni_checkpoint(tempfile.mkdtemp() + "/ck", seed=0)
spec, media = OmniSpec.from_config(path), read_media("data/omni_inputs")
frames = {}
for dev in ("cpu", "cuda"):
    model = q3lab.load(path, towers=True, device=dev)
    frames[dev] = record_media(model, spec, media, [10, 11, 12], [20, 21, 22], max_new_tokens=3).to_frame()
a, b = frames["cpu"], frames["cuda"]
print("rows", len(a), len(b), "| modality equal:", a["modality"].tolist() == b["modality"].tolist(),
      "| experts equal:", bool((a["expert"].to_numpy() == b["expert"].to_numpy()).all()),
      "| max weight diff:", float(np.abs(a["weight"].to_numpy() - b["weight"].to_numpy()).max()))
print(M.modality_entropy(M.modality_load(b)).groupby("modality")["normalised_entropy"].mean().round(3).to_string())
PY
} 2>&1 | tee "$OUT/omnirec.txt"
