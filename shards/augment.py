"""The augmentation and normalization semantics both backends share.

An epoch's augmentation is part of its plan: `draw_plan` draws, per sample of
the rank's reading order, the dihedral transform and the shear from (seed,
epoch, rank) alone, and both backends apply exactly those, so the DALI and
the torch backend give the same sample the same transform (flips and
transposes exactly, the shear to interpolation rounding).

Per sample, in this order, on the uint8 (H, W, 6) site:
1. shear (the reference's IAAAffine(shear=10), p=0.5): imgaug's Affine maps a
   point p to c + A (p - c) about the image centre c with skimage's
   AffineTransform(shear=θ) matrix A = [[1, -sin θ], [0, cos θ]] (x right, y
   down), θ uniform in [-shear_deg, shear_deg]; bilinear.  Outside the source
   the border pixel is repeated: DALI's `warp_affine` offers a constant or the
   border, not imgaug's reflection, and a constant would paint a black wedge
   the real images never have.
2. the dihedral group of the square (4 rotations x optional mirror), as an
   optional horizontal flip, an optional vertical flip, then an optional
   transpose of height and width (flips and transposes are exact and cheaper
   than a rotation), emitted CHW.
The torch backend calls `shear_hwc` and `dihedral_chw`; tests compare against
`all_dihedral`.  Channel dropout and normalization follow on the delivery
device (`shards.loader.deliver`).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def draw_plan(n: int, seed: int, epoch: int, rank: int, shear_deg: float,
              shear_p: float) -> dict:
    """Per sample i of an epoch's reading order: `flips[i]` = (hflip, vflip, transpose)
    as 0/1, and `shear[i]` the shear angle in degrees (0.0: no shear)."""
    rng = np.random.default_rng([seed, epoch, rank, 3])
    flips = rng.integers(0, 2, (n, 3)).astype(np.int32)
    hit = rng.random(n) < shear_p
    angle = rng.uniform(-shear_deg, shear_deg, n)
    return {"flips": flips, "shear": np.where(hit, angle, 0.0).astype(np.float32)}


def shear_matrix(angle_deg: float, height: int, width: int) -> np.ndarray:
    """(2, 3) float32 destination -> source map of the shear, in pixel coordinates whose
    (0, 0) is the corner of the first pixel (DALI's `warp_affine` convention; a pixel
    centre is at +0.5).  Inverse of p -> c + A (p - c), A = [[1, -sin θ], [0, cos θ]]."""
    t = math.radians(angle_deg)
    inv = np.array([[1.0, math.tan(t)], [0.0, 1.0 / math.cos(t)]])
    centre = np.array([width / 2.0, height / 2.0])
    return np.concatenate([inv, (centre - inv @ centre)[:, None]], axis=1).astype(np.float32)


def shear_hwc(hwc: np.ndarray, angle_deg: float) -> np.ndarray:
    """The shear of a uint8 (H, W, C) site as DALI's `warp_affine` does it: bilinear,
    border repeated, rounded to uint8."""
    h, w, _ = hwc.shape
    m = torch.from_numpy(shear_matrix(angle_deg, h, w).astype(np.float64))
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64) + 0.5,
                            torch.arange(w, dtype=torch.float64) + 0.5, indexing="ij")
    sx = m[0, 0] * xs + m[0, 1] * ys + m[0, 2]
    sy = m[1, 0] * xs + m[1, 1] * ys + m[1, 2]
    # grid_sample with align_corners=False: -1 and 1 are the outer pixel edges
    grid = torch.stack([sx / w * 2 - 1, sy / h * 2 - 1], dim=-1)[None].float()
    x = torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1)))[None].float()
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[0].round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


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
