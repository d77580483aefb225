"""ArcFace margin head and loss (train.arcface)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from train.arcface import ArcFaceBranch, arcface_logits, arcface_loss, margin_cosine
from train.config_schema import ConfigError


def test_margin_is_added_to_the_angle_and_stays_monotonic():
    theta = torch.linspace(0, math.pi, 200)
    phi = margin_cosine(theta.cos(), 0.5)
    low = theta < math.pi - 0.5
    assert torch.allclose(phi[low], (theta[low] + 0.5).cos(), atol=1e-5)
    assert (phi[1:] <= phi[:-1] + 1e-6).all()     # decreasing in theta everywhere


def test_hard_and_one_hot_targets_give_the_usual_arcface_loss():
    g = torch.Generator().manual_seed(0)
    cosine = torch.rand(32, 11, generator=g) * 2 - 1
    y = torch.randint(0, 11, (32,), generator=g)
    ref = F.cross_entropy(arcface_logits(cosine, y, 30.0, 0.5), y)
    assert arcface_loss(cosine, y).item() == pytest.approx(ref.item(), rel=1e-5)
    soft = arcface_loss(cosine, F.one_hot(y, 11).float())
    assert soft.item() == pytest.approx(ref.item(), rel=1e-4)
    # a row that is all but certain: no cancellation in the soft form
    sure = torch.full((1, 11), -1.0)
    sure[0, 3] = 1.0
    t = F.one_hot(torch.tensor([3]), 11).float()
    assert arcface_loss(sure, t).item() == pytest.approx(
        arcface_loss(sure, torch.tensor([3])).item(), rel=1e-4, abs=1e-6)


def test_soft_target_loss_is_the_mix_of_the_label_losses():
    cosine = torch.rand(6, 5) * 2 - 1
    a, b = torch.tensor([0, 1, 2, 3, 4, 0]), torch.tensor([1, 2, 3, 4, 0, 0])
    lam = torch.tensor([0.2, 0.5, 0.7, 1.0, 0.0, 0.4])
    soft = lam[:, None] * F.one_hot(a, 5) + (1 - lam[:, None]) * F.one_hot(b, 5)
    per = lam * F.cross_entropy(arcface_logits(cosine, a, 30, 0.5), a, reduction="none") + \
        (1 - lam) * F.cross_entropy(arcface_logits(cosine, b, 30, 0.5), b, reduction="none")
    assert arcface_loss(cosine, soft).item() == pytest.approx(per.mean().item(), rel=1e-4)


def test_loss_decreases_on_separable_toy_embeddings():
    torch.manual_seed(0)
    k, d, n = 6, 16, 240
    centres = torch.randn(k, d) * 3
    y = torch.arange(n) % k
    x = centres[y] + 0.5 * torch.randn(n, d)
    branch = ArcFaceBranch(d, k, dim=32, s=30.0, m=0.5)
    opt = torch.optim.Adam(branch.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        _emb, cosine = branch(x)
        loss = branch.loss(cosine, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses
    branch.eval()
    emb, cosine = branch(x)
    assert emb.shape == (n, 32) and cosine.shape == (n, k)
    assert (cosine.argmax(1) == y).float().mean().item() == 1.0


def test_bad_margin_is_a_config_error():
    with pytest.raises(ConfigError, match="model_params.arcface"):
        ArcFaceBranch(8, 3, m=2.0)
