"""Photo-like test images of a round part on a background, shared by the tests."""

from __future__ import annotations

import numpy as np


def part_photo(side: int = 120, bg: int = 190, part: int = 70, rgb: bool = False, off: tuple[int, int] = (0, 0),
               noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """A dark disc (with a brighter emblem bar) on a light background, like the real photos; NOISE: the
    sd of Gaussian grain over the whole photo (seeded), so a background is not one flat value."""
    yy, xx = np.mgrid[:side, :side]
    c = side / 2
    img = np.full((side, side), bg, np.float64)
    disc = (xx - c - off[0]) ** 2 + (yy - c - off[1]) ** 2 < (side * 0.3) ** 2
    img[disc] = part
    img[disc & (abs(yy - c - off[1]) < side * 0.05)] = 120
    if noise:
        img += np.random.default_rng(seed).normal(0, noise, img.shape)
    img = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return np.repeat(img[..., None], 3, axis=2) if rgb else img
