"""Batch augmentations of the plus recipe, on the delivered float batch: zoom, jitter, CutMix.

They act on what the loader delivers (normalized float images on the training
device), so the DALI and the torch backend get the same augmentation and
nothing runs on the CPU per sample.  Every random draw comes from one
torch.Generator (CPU, seeded by the caller: per rank, so ranks differ), and the
few draws per batch are moved to the batch's device: same seed, same batch.

- zoom: a random square crop of `min_side`..1 of the side, resized back to the
  input size (bilinear, one `grid_sample` for the whole batch).
- jitter: per sample and channel, x * scale + shift with scale ~ N(1, scale_sd)
  and shift ~ N(0, shift_sd), in normalized units.
- CutMix: each sample gets a box of another sample of the batch pasted in; its
  target is the two labels mixed by area (the pasted share of the pixels).
  The box area is drawn as Beta(beta, beta) (beta = 1: uniform) per sample.

`soft_cross_entropy` is the loss for the mixed (soft) targets, with label smoothing.
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
    """Which batch augmentations run and how; `p_*` = 0 turns one off (the default: all off)."""
    p_zoom: float = 0.0
    min_side: float = 0.5         # zoom crop side, as a share of the image side: U(min_side, 1)
    p_jitter: float = 0.0
    scale_sd: float = 0.1
    shift_sd: float = 0.1
    p_cutmix: float = 0.0
    beta: float = 1.0

    @classmethod
    def from_params(cls, zoom=None, jitter=None, cutmix=None) -> "BatchAugment":
        """From the config's `zoom` / `jitter` / `cutmix` entries: null/false = off, true =
        on with the defaults, or a mapping {p, ...} (p defaults to 1)."""
        kw = {}
        for name, value, keys in (("zoom", zoom, ("min_side",)),
                                  ("jitter", jitter, ("scale_sd", "shift_sd")),
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
        for name in ("p_zoom", "p_jitter", "p_cutmix"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{WHERE}.{name[2:]}.p {getattr(self, name)}: must be in [0, 1]")
        if not 0.0 < self.min_side <= 1.0:
            raise ConfigError(f"{WHERE}.zoom.min_side {self.min_side}: must be in (0, 1]")
        if self.scale_sd < 0 or self.shift_sd < 0:
            raise ConfigError(f"{WHERE}.jitter: scale_sd and shift_sd must be >= 0")
        if self.beta <= 0:
            raise ConfigError(f"{WHERE}.cutmix.beta {self.beta}: must be > 0")

    @property
    def active(self) -> bool:
        return self.p_zoom > 0 or self.p_jitter > 0 or self.p_cutmix > 0

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, soft targets (B, num_classes)) for a batch and its int labels."""
        targets = F.one_hot(labels.long(), num_classes).to(images.dtype)
        if self.p_zoom > 0:
            images = zoom(images, generator, self.min_side, self.p_zoom)
        if self.p_jitter > 0:
            images = jitter(images, generator, self.scale_sd, self.shift_sd, self.p_jitter)
        if self.p_cutmix > 0:
            images, targets = cutmix(images, targets, generator, self.beta, self.p_cutmix)
        return images, targets


def _chosen(n: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """Which samples of a batch of n an augmentation with probability p touches (CPU bool)."""
    return torch.rand(n, generator=generator) < p


def zoom(images: torch.Tensor, generator: torch.Generator, min_side: float = 0.5,
         p: float = 1.0, side: torch.Tensor | None = None) -> torch.Tensor:
    """A random crop of side U(min_side, 1) (of the image side) at a random place, resized
    back to the input size.  `side`: fixed sides per sample instead (tests)."""
    n = images.shape[0]
    if side is None:
        side = min_side + (1.0 - min_side) * torch.rand(n, generator=generator)
        side = torch.where(_chosen(n, p, generator), side, torch.ones(n))
    side = side.float()
    # The crop's centre, in grid units (-1..1), keeps the whole crop inside the image.
    centre = (1.0 - side)[:, None] * (2.0 * torch.rand(n, 2, generator=generator) - 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = side
    theta[:, 1, 1] = side
    theta[:, :, 2] = centre
    theta = theta.to(device=images.device, dtype=images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border",
                         align_corners=False)


def jitter(images: torch.Tensor, generator: torch.Generator, scale_sd: float = 0.1,
           shift_sd: float = 0.1, p: float = 1.0) -> torch.Tensor:
    """x * scale + shift per sample and channel, scale ~ N(1, scale_sd), shift ~ N(0, shift_sd)."""
    n, c = images.shape[:2]
    scale = 1.0 + scale_sd * torch.randn(n, c, generator=generator)
    shift = shift_sd * torch.randn(n, c, generator=generator)
    keep = ~_chosen(n, p, generator)
    scale[keep], shift[keep] = 1.0, 0.0
    scale = scale.to(device=images.device, dtype=images.dtype)[:, :, None, None]
    shift = shift.to(device=images.device, dtype=images.dtype)[:, :, None, None]
    return images * scale + shift


def _beta(alpha: float, n: int, generator: torch.Generator) -> torch.Tensor:
    if alpha == 1.0:
        return torch.rand(n, generator=generator)
    # torch's Beta takes no generator: seed numpy from it, so the draw stays reproducible.
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
    return torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha, n)).float()


def cutmix(images: torch.Tensor, targets: torch.Tensor, generator: torch.Generator,
           beta: float = 1.0, p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste into each chosen sample a box of another sample (a random pairing of the batch).

    The box's share of the area is drawn from Beta(beta, beta); boxes are clipped to the
    image, and the targets mixed by the area actually pasted:
    target = (1 - pasted) * own + pasted * other.  `targets`: (B, C) float (one-hot or soft).
    """
    n, _, h, w = images.shape
    partner = torch.randperm(n, generator=generator)
    area = _beta(beta, n, generator)
    area = torch.where(_chosen(n, p, generator), area, torch.zeros(n))
    cut_h = (h * area.sqrt()).round().long()
    cut_w = (w * area.sqrt()).round().long()
    cy = (torch.rand(n, generator=generator) * h).long()
    cx = (torch.rand(n, generator=generator) * w).long()
    y0, y1 = (cy - cut_h // 2).clamp(0, h), (cy - cut_h // 2 + cut_h).clamp(0, h)
    x0, x1 = (cx - cut_w // 2).clamp(0, w), (cx - cut_w // 2 + cut_w).clamp(0, w)
    pasted = ((y1 - y0) * (x1 - x0)).float() / float(h * w)

    dev = images.device
    ys = torch.arange(h, device=dev)[None, :, None]
    xs = torch.arange(w, device=dev)[None, None, :]
    y0, y1, x0, x1 = (t.to(dev)[:, None, None] for t in (y0, y1, x0, x1))
    box = ((ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1))[:, None]   # (B, 1, H, W)
    partner_dev = partner.to(dev)
    mixed = torch.where(box, images[partner_dev], images)
    share = pasted.to(device=dev, dtype=targets.dtype)[:, None]
    mixed_targets = (1.0 - share) * targets + share * targets[partner_dev]
    return mixed, mixed_targets


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                       smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy against soft targets (B, C) or int labels (B,), with label
    smoothing: the target becomes (1 - smoothing) * target + smoothing / C."""
    logp = F.log_softmax(logits.float(), dim=-1)
    n_classes = logits.shape[-1]
    if targets.dim() == 1:
        targets = F.one_hot(targets.long(), n_classes).to(logp.dtype)
    targets = targets.to(logp.dtype)
    if smoothing:
        targets = (1.0 - smoothing) * targets + smoothing / n_classes
    return -(targets * logp).sum(dim=-1).mean()
