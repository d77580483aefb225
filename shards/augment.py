"""The augmentation and normalization semantics both backends share, in numpy.

The dihedral group of the square (4 rotations x optional mirror) is done as
an optional horizontal flip, an optional vertical flip, then an optional
transpose of height and width: the same three coin flips the DALI pipeline
draws (flips and transposes are exact and cheaper than `fn.rotate`).
The torch backend calls `dihedral_chw`; tests compare against `all_dihedral`.
"""
from __future__ import annotations

import numpy as np


def dihedral_chw(hwc: np.ndarray, hflip: bool, vflip: bool, transpose: bool) -> np.ndarray:
    """(H, W, C) -> contiguous (C, H, W) after the flips, then the transpose (one copy)."""
    if hflip:
        hwc = hwc[:, ::-1]
    if vflip:
        hwc = hwc[::-1]
    return np.ascontiguousarray(hwc.transpose(2, 1, 0) if transpose else hwc.transpose(2, 0, 1))


def all_dihedral(chw: np.ndarray) -> list[np.ndarray]:
    """The 8 dihedral transforms of a (C, H, W) image, identity first."""
    hwc = chw.transpose(1, 2, 0)
    return [dihedral_chw(hwc, h, v, t) for t in (0, 1) for v in (0, 1) for h in (0, 1)]


def normalize(hwc: np.ndarray, mean_std: np.ndarray, channels) -> np.ndarray:
    """Reference normalization of one site: (pixel - mean) / std for the 1-based
    `channels`, (C, H, W) float32; `mean_std` is the row's (6, 2) norm entry."""
    idx = [c - 1 for c in channels]
    x = hwc[..., idx].astype(np.float32).transpose(2, 0, 1)
    return (x - mean_std[idx, 0, None, None]) / mean_std[idx, 1, None, None]
