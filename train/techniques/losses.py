"""The losses the plus and first recipes add: dense (soft-target) cross-entropy, ArcFace,
and the 1st place's sum of the two.

ArcFace (the 1st place's `ArcFaceLoss`, model.py:196-216 of
maciej-sypetkowski/kaggle-rcic-1st): the margin product gives cos(theta_j) between the
L2-normalized embedding and the L2-normalized class weights; the target's logit becomes
cos(theta + m) where theta + m <= pi, else the linear continuation cos(theta) - m sin(m)
(insightface's `easy_margin=False`); all logits are scaled by s.  With soft targets t
(CutMix mixes two labels) each class's logit is t_c * phi_c + (1 - t_c) * cos_c, exactly
as that code mixes them, and the loss is the dense cross-entropy against t, halved (its
`return loss / 2`).  For a one-hot t this is the usual ArcFace loss, halved.

The 1st place trains `(1 - w) * CE(softmax head) + w * ArcFace` with w = 0.2
(main.py:44 `--metric-loss-coeff 0.2`, model.py:173-174): 0.8 CE + 0.1 ArcFace-CE.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class ArcMarginProduct(nn.Module):
    """embedding (B, dim) -> cosine (B, num_classes) to L2-normalized class weights
    (model.py:219-231: weights uniform in +-1/sqrt(dim))."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        bound = 1.0 / math.sqrt(dim)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        cosine = F.linear(F.normalize(embedding.float()), F.normalize(self.weight.float()))
        return cosine.clamp(-1.0, 1.0)


def margin_cosine(cosine: torch.Tensor, m: float) -> torch.Tensor:
    """cos(theta + m) where theta + m <= pi, else the linear continuation cos(theta) - m sin(m)."""
    sine = (1.0 - cosine * cosine).clamp_min(0.0).sqrt()
    phi = cosine * math.cos(m) - sine * math.sin(m)
    return torch.where(cosine > math.cos(math.pi - m), phi, cosine - math.sin(math.pi - m) * m)


def dense_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
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


def arcface_loss(cosine: torch.Tensor, targets: torch.Tensor, s: float = 30.0,
                 m: float = 0.5) -> torch.Tensor:
    """The 1st place's ArcFace loss (halved) for int labels (B,) or soft targets (B, C)."""
    cosine = cosine.float()
    if targets.dim() == 1:
        targets = F.one_hot(targets.long(), cosine.shape[-1])
    t = targets.to(cosine.dtype)
    logits = s * (t * margin_cosine(cosine, m) + (1.0 - t) * cosine)
    return dense_cross_entropy(logits, t) / 2


def first_place_loss(logits: torch.Tensor, cosine: torch.Tensor | None, targets: torch.Tensor,
                     weight: float, s: float, m: float, smoothing: float = 0.0) -> torch.Tensor:
    """(1 - weight) * CE(logits) + weight * ArcFace(cosine) (ArcFace already halved);
    without a margin product (cosine None) the plain CE."""
    ce = dense_cross_entropy(logits, targets, smoothing)
    if cosine is None:
        return ce
    return (1.0 - weight) * ce + weight * arcface_loss(cosine, targets, s, m)
