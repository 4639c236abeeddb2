"""Write data/omni_inputs/: the tiny deterministic inputs notebook 08 runs on headless.

    python scripts/make_omni_inputs.py [OUT]

tone.wav: 0.5 s of 16 kHz mono 16-bit PCM, a rising chirp (300 -> 1200 Hz) with a little seeded noise (16 KB).
shapes.png: a 128 x 96 RGB image, a colour gradient with a disc and a bar (a few hundred bytes).
Both come out byte-identical on every run (soundfile writes no date; Pillow's PNG carries no timestamp).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image

RATE = 16000


def make(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(0.5 * RATE)) / RATE
    phase = 2 * np.pi * (300 * t + 0.5 * (1200 - 300) / 0.5 * t ** 2)       # linear chirp
    wav = 0.4 * np.sin(phase) + 0.02 * np.random.default_rng(0).standard_normal(t.size)
    soundfile.write(out / "tone.wav", wav.astype(np.float32), RATE, subtype="PCM_16")
    h, w = 96, 128
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), np.full_like(x, 96)], -1).astype(np.uint8)
    img[(x - 40) ** 2 + (y - 48) ** 2 < 24 ** 2] = (250, 240, 40)             # a disc
    img[60:76, 72:120] = (20, 20, 160)                                           # a bar
    Image.fromarray(img, "RGB").save(out / "shapes.png", optimize=False)
    return [out / "tone.wav", out / "shapes.png"]


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "data" / "omni_inputs"
    for p in make(target):
        print(p, p.stat().st_size, "bytes")
