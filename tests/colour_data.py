"""Synthetic colour datasets for the channel tests: defects that differ from the background only in hue.

`hue_dataset` writes a folder-per-class dataset (`<Class>/Imgs/<name>.png` + `<name>_mask.png`)
whose background is gray noise and whose defects are the same noise shifted by `HUE_SHIFT` in
R, G and B: a shift of zero luma (0.299 R + 0.587 G + 0.114 B), so a gray model sees nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

HUE_SHIFT = np.array([64, -46, 69])
"""RGB shift of a defect pixel: 299 * 64 - 587 * 46 + 114 * 69 = 0, so its luma is unchanged."""

NOISE = 12
"""Standard deviation of the background's gray noise, in levels (clipped at 3 of them)."""


def hue_image(rng: np.random.Generator, size: int, defect: np.ndarray | None) -> np.ndarray:
    """(size, size, 3) uint8: gray noise around 128, shifted by `HUE_SHIFT` where `defect` is set."""
    gray = 128 + np.clip(rng.normal(0, NOISE, (size, size)), -3 * NOISE, 3 * NOISE).round()
    rgb = np.repeat(gray[..., None], 3, axis=2)
    if defect is not None:
        rgb[defect] += HUE_SHIFT
    return rgb.astype(np.uint8)


def blob(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size) bool: a random axis-aligned ellipse of a fifth to a third of the side."""
    rows, cols = np.mgrid[:size, :size]
    radii = rng.uniform(size / 10, size / 6, 2)
    centre = rng.uniform(radii, size - radii)  # anywhere: no place where defects are likelier
    return ((rows - centre[0]) / radii[0]) ** 2 + ((cols - centre[1]) / radii[1]) ** 2 <= 1


def hue_dataset(root: Path, *, defects: int = 24, free: int = 8, size: int = 48, seed: int = 0) -> Path:
    """Write the dataset: class ``spot`` (`defects` images) and ``good`` (`free` defect-free ones)."""
    rng = np.random.default_rng(seed)
    for folder, count in (("spot", defects), ("good", free)):
        images = root / folder / "Imgs"
        images.mkdir(parents=True, exist_ok=True)
        for n in range(count):
            mask = blob(rng, size) if folder == "spot" else None
            Image.fromarray(hue_image(rng, size, mask)).save(images / f"{folder}{n:03d}.png")
            if mask is not None:
                Image.fromarray(mask.astype(np.uint8) * 255).save(images / f"{folder}{n:03d}_mask.png")
    return root
