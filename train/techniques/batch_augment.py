"""Batch augmentations on the delivered float batch: intensity jitter and CutMix.

They act on what the loader delivers (normalized float images on the training
device), so the DALI and the torch backend get the same augmentation.  Every
random draw comes from one torch.Generator (CPU, seeded by the caller: per rank,
so ranks differ): same seed, same batch.  (The zoom runs in the loader, in pixel
space before normalization, as the 1st place ran it: shards.loader.)

- jitter: per sample and channel, x * scale + shift with scale ~ N(1, scale_sd) and
  shift ~ N(0, shift_sd), in normalized units (dataset.py:73-76 of the 1st place,
  `--pw-aug 0.1,0.1`, after normalization).
- CutMix: ONE box per batch (main.py:274-290): lambda ~ Beta(beta, beta), a centre
  uniform in the image, sides sqrt(1 - lambda) of the image's, clipped; the box of a
  random permutation of the batch is pasted into every sample, and the labels AND the
  cell-type vectors are mixed by the area actually pasted.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from train.config_schema import ConfigError

WHERE = "stages.data_params"


@dataclass(frozen=True)
class BatchAugment:
    """Which batch augmentations run and how; `p_*` = 0 turns one off (the default: all off).
    `p_cutmix`: the chance that a batch is mixed (the 1st place: every batch)."""
    p_jitter: float = 0.0
    scale_sd: float = 0.1
    shift_sd: float = 0.1
    p_cutmix: float = 0.0
    beta: float = 1.0

    @classmethod
    def from_params(cls, jitter=None, cutmix=None) -> "BatchAugment":
        """From the config's `jitter` / `cutmix` entries: null/false = off, true = on with
        the defaults, or a mapping {p, ...} (p defaults to 1)."""
        kw = {}
        for name, value, keys in (("jitter", jitter, ("scale_sd", "shift_sd")),
                                  ("cutmix", cutmix, ("beta",))):
            if value is None or value is False:
                continue
            if value is not True and not isinstance(value, dict):
                raise ConfigError(f"{WHERE}.{name}: {value!r}; null/false (off), true or a "
                                  f"mapping of {sorted({'p', *keys})}")
            value = {} if value is True else dict(value)
            unknown = set(value) - {"p", *keys}
            if unknown:
                raise ConfigError(f"{WHERE}.{name}: unknown key(s) {sorted(unknown)}; valid: "
                                 f"{sorted({'p', *keys})}")
            value.setdefault("p", 1.0)
            for k, v in value.items():
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise ConfigError(f"{WHERE}.{name}.{k} {v!r}: need a number")
                kw[f"p_{name}" if k == "p" else k] = float(v)
        aug = cls(**kw)
        aug.check()
        return aug

    def check(self) -> None:
        for name in ("p_jitter", "p_cutmix"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{WHERE}.{name[2:]}.p {getattr(self, name)}: must be in [0, 1]")
        if self.scale_sd < 0 or self.shift_sd < 0:
            raise ConfigError(f"{WHERE}.jitter: scale_sd and shift_sd must be >= 0")
        if self.beta <= 0:
            raise ConfigError(f"{WHERE}.cutmix.beta {self.beta}: must be > 0")

    @property
    def active(self) -> bool:
        return self.p_jitter > 0 or self.p_cutmix > 0

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 generator: torch.Generator, cell: torch.Tensor | None = None):
        """(images, soft targets (B, num_classes), cell) for a batch, its int labels and
        its cell-type vectors (B, 4) or None."""
        targets = F.one_hot(labels.long(), num_classes).to(images.dtype)
        if self.p_jitter > 0:
            images = jitter(images, generator, self.scale_sd, self.shift_sd, self.p_jitter)
        if self.p_cutmix > 0 and float(torch.rand(1, generator=generator)) < self.p_cutmix:
            images, targets, cell = cutmix(images, targets, generator, self.beta, cell)
        return images, targets, cell


def jitter(images: torch.Tensor, generator: torch.Generator, scale_sd: float = 0.1,
           shift_sd: float = 0.1, p: float = 1.0) -> torch.Tensor:
    """x * scale + shift per sample and channel, scale ~ N(1, scale_sd), shift ~ N(0, shift_sd)."""
    n, c = images.shape[:2]
    scale = 1.0 + scale_sd * torch.randn(n, c, generator=generator)
    shift = shift_sd * torch.randn(n, c, generator=generator)
    keep = ~(torch.rand(n, generator=generator) < p)
    scale[keep], shift[keep] = 1.0, 0.0
    scale = scale.to(device=images.device, dtype=images.dtype)[:, :, None, None]
    shift = shift.to(device=images.device, dtype=images.dtype)[:, :, None, None]
    return images * scale + shift


def _beta(alpha: float, generator: torch.Generator) -> float:
    if alpha == 1.0:
        return float(torch.rand(1, generator=generator))
    # torch's Beta takes no generator: seed numpy from it, so the draw stays reproducible.
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def cutmix_box(h: int, w: int, lam: float, row: float, col: float) -> tuple[int, int, int, int]:
    """(r1, r2, c1, c2) of the 1st place's box (main.py:277-284): sides sqrt(1 - lam) of the
    image's around (row, col), clipped to the image."""
    height, width = (1 - lam) ** 0.5 * h, (1 - lam) ** 0.5 * w
    return (round(max(0, row - height / 2)), round(min(h, row + height / 2)),
            round(max(0, col - width / 2)), round(min(w, col + width / 2)))


def cutmix(images: torch.Tensor, targets: torch.Tensor, generator: torch.Generator,
           beta: float = 1.0, cell: torch.Tensor | None = None):
    """One box for the whole batch, pasted from a random permutation of it; targets (B, C)
    and the cell-type vectors (B, 4) mixed by the pasted share of the area.
    Returns (images, targets, cell)."""
    n, _, h, w = images.shape
    perm = torch.randperm(n, generator=generator).to(images.device)
    lam = _beta(beta, generator)
    row, col = (torch.rand(2, generator=generator) * torch.tensor([h, w])).tolist()
    r1, r2, c1, c2 = cutmix_box(h, w, lam, row, col)
    if not (r1 < r2 and c1 < c2):
        return images, targets, cell
    images = images.clone()
    images[:, :, r1:r2, c1:c2] = images[perm, :, r1:r2, c1:c2]
    keep = 1.0 - (r2 - r1) * (c2 - c1) / (h * w)
    targets = targets * keep + targets[perm] * (1.0 - keep)
    if cell is not None:
        cell = cell * keep + cell[perm] * (1.0 - keep)
    return images, targets, cell
