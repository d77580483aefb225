"""ArcFace: an additive angular margin head on a BatchNorm'd embedding, and its loss.

The plus recipe trains it beside the softmax head as an auxiliary loss
(weight 0.2 in configs/plus.yml); it shapes the embedding so that the classes
sit apart on the sphere, and the softmax head is what predicts.

Logits are s * cos(theta_j) between the L2-normalized embedding and the
L2-normalized class weights; the target class gets s * cos(theta + m) instead.
Past theta = pi - m, cos(theta + m) would rise again; there the usual
linear continuation cos(theta) - m * sin(m) keeps the target logit decreasing
in theta (insightface's `easy_margin=False`).

The loss takes soft targets too (CutMix mixes two labels): for a target
distribution t it is -sum_c t_c log p_c, where p_c is the softmax probability
of class c with the margin on c — for a one-hot t exactly the usual ArcFace loss.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from train.config_schema import ConfigError


class ArcFaceBranch(nn.Module):
    """features (B, in_features) -> (embedding (B, dim), cosine (B, num_classes)).

    The embedding is Linear then BatchNorm1d of the pooled backbone features."""

    def __init__(self, in_features: int, num_classes: int, dim: int = 512,
                 s: float = 30.0, m: float = 0.5):
        super().__init__()
        if s <= 0 or not 0 <= m < math.pi / 2:
            raise ConfigError(f"model_params.arcface: s {s} must be > 0 and m {m} in [0, pi/2)")
        self.neck = nn.Sequential(nn.Linear(in_features, dim, bias=False), nn.BatchNorm1d(dim))
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        nn.init.xavier_uniform_(self.weight)
        self.s, self.m = float(s), float(m)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.neck(features)
        cosine = F.linear(F.normalize(emb.float()), F.normalize(self.weight.float()))
        return emb, cosine.clamp(-1.0, 1.0)

    def loss(self, cosine: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return arcface_loss(cosine, targets, self.s, self.m)


def margin_cosine(cosine: torch.Tensor, m: float) -> torch.Tensor:
    """cos(theta + m) where theta + m <= pi, else the linear continuation cos(theta) - m sin(m)."""
    sine = (1.0 - cosine * cosine).clamp_min(0.0).sqrt()
    phi = cosine * math.cos(m) - sine * math.sin(m)
    return torch.where(cosine > math.cos(math.pi - m), phi, cosine - math.sin(math.pi - m) * m)


def arcface_logits(cosine: torch.Tensor, labels: torch.Tensor, s: float, m: float) -> torch.Tensor:
    """s * cos with the margin on each row's label (int labels): the usual ArcFace logits."""
    onehot = F.one_hot(labels.long(), cosine.shape[-1]).bool()
    return s * torch.where(onehot, margin_cosine(cosine, m), cosine)


def arcface_loss(cosine: torch.Tensor, targets: torch.Tensor, s: float = 30.0,
                 m: float = 0.5) -> torch.Tensor:
    """Mean ArcFace loss for int labels (B,) or soft targets (B, C)."""
    cosine = cosine.float()
    if targets.dim() == 1:
        return F.cross_entropy(arcface_logits(cosine, targets, s, m), targets.long())
    b = s * cosine                       # logits without the margin
    a = s * margin_cosine(cosine, m)     # the logit of class c when c is the target
    # log sum_{j != c} exp(b_j) for every c.  From the total this is exact to rounding
    # except for the row's largest logit (which may hold nearly all the mass): that one
    # is summed directly with itself left out.
    lse = torch.logsumexp(b, dim=1, keepdim=True)
    others = lse + torch.log1p(-(b - lse).exp().clamp(max=0.5))
    top = b.argmax(dim=1, keepdim=True)
    without_top = torch.logsumexp(b.scatter(1, top, float("-inf")), dim=1, keepdim=True)
    others = others.scatter(1, top, without_top)
    logp = a - torch.logaddexp(a, others)
    return -(targets.float() * logp).sum(dim=1).mean()
