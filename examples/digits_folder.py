"""Write scikit-learn's handwritten digits as an image folder that ``--data`` reads.

A real data set that needs no download (scikit-learn ships it: 1,797 scans of the digits
0-9, 8x8 pixels, 16 grey levels), so a search and its random baseline can be tried on real
images in minutes on a CPU. Each image is scaled up to ``--size`` pixels (bilinear) and saved
as a grey PNG under ``OUT/train/<digit>/`` or ``OUT/val/<digit>/``: a seeded, per-class split
(``--val-fraction`` of each class to val).

    pip install "fbnet_fast[examples]"
    python examples/digits_folder.py data/digits
    fbnet-fast search --preset quick --data data/digits --out runs/digits
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F


def write_digits(out: str, size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> dict:
    """Write the folder; returns the number of images per split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit('this example needs scikit-learn: pip install "fbnet_fast[examples]"')
    from PIL import Image
    if not 0 < val_fraction < 1:
        raise SystemExit(f"--val-fraction must be in (0, 1), got {val_fraction}")
    if size < 8:
        raise SystemExit(f"--size must be >= 8, got {size}")
    digits = load_digits()
    images = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0   # [n, 1, 8, 8]
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).squeeze(1).numpy()
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "val": 0}
    for digit in range(10):
        idx = np.flatnonzero(digits.target == digit)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction))
        for split, part in (("val", idx[:n_val]), ("train", idx[n_val:])):
            folder = os.path.join(out, split, str(digit))
            os.makedirs(folder, exist_ok=True)
            for i in part:
                Image.fromarray(pixels[i], mode="L").save(os.path.join(folder, f"{i:04d}.png"))
            counts[split] += len(part)
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="folder to write (train/ and val/ inside)")
    p.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    counts = write_digits(a.out, a.size, a.val_fraction, a.seed)
    print(f"{counts['train']} training and {counts['val']} validation images -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
