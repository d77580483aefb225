"""The plus recipe's batch augmentations (train.batch_augment): CutMix, jitter, zoom, soft CE."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from train.batch_augment import BatchAugment, cutmix, jitter, soft_cross_entropy, zoom
from train.config_schema import ConfigError


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_cutmix_targets_sum_to_one_and_match_the_pasted_pixels():
    n, c, h, w, k = 64, 3, 24, 20, 7
    # Every sample is a constant image equal to its index: a pixel tells where it came from.
    images = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, c, h, w).clone()
    labels = torch.arange(n) % k
    targets = F.one_hot(labels, k).float()
    mixed, soft = cutmix(images, targets, _gen(1), beta=1.0)
    assert torch.allclose(soft.sum(1), torch.ones(n), atol=1e-6)
    n_mixed = 0
    for i in range(n):
        src = mixed[i, 0]
        own = (src == i).float().mean().item()
        assert (mixed[i] == mixed[i, :1]).all()           # the same box in every channel
        others = src[src != i].unique()
        assert len(others) <= 1                            # one partner per sample
        expected = torch.zeros(k)
        expected[labels[i]] += own
        if len(others):
            n_mixed += 1
            j = int(others[0])
            assert (src == j).float().mean().item() == pytest.approx(1 - own, abs=1e-6)
            expected[labels[j]] += 1 - own
        assert torch.allclose(soft[i], expected, atol=1e-6), i
    assert n_mixed > n // 2   # beta 1: most samples get a box of another


def test_cutmix_is_seeded_and_p0_leaves_the_batch():
    x = torch.randn(8, 2, 16, 16)
    t = F.one_hot(torch.arange(8) % 3, 3).float()
    a, ta = cutmix(x, t, _gen(5))
    b, tb = cutmix(x, t, _gen(5))
    assert torch.equal(a, b) and torch.equal(ta, tb)
    same, ts = cutmix(x, t, _gen(5), p=0.0)
    assert torch.equal(same, x) and torch.equal(ts, t)


def test_cutmix_areas_follow_the_beta_law():
    n = 2000
    x = torch.zeros(n, 1, 32, 32)
    _, soft = cutmix(x, torch.eye(n), _gen(2), beta=1.0)
    own = soft.diagonal()
    # beta 1: the drawn share is uniform (mean 1/2); clipping at the border only shrinks
    # boxes, and a sample paired with itself keeps all of its label
    pasted = 1 - own
    assert 0.25 < pasted.mean().item() < 0.5
    assert (pasted <= 1).all() and (pasted >= 0).all()
    assert (pasted > 0.5).float().mean().item() > 0.1
    soft4 = cutmix(x, torch.eye(n), _gen(2), beta=4.0)[1]
    # beta 4 concentrates the share near 1/2: fewer tiny and fewer huge boxes than beta 1
    assert ((1 - soft4.diagonal()) < 0.05).float().mean() < ((1 - own) < 0.05).float().mean()


def test_jitter_statistics():
    n, c = 20000, 6
    x = torch.zeros(n, c, 2, 2)
    shift = jitter(x, _gen(3), scale_sd=0.1, shift_sd=0.1)
    assert torch.equal(shift[..., 0, 0], shift[..., 1, 1])        # one shift per channel
    s = shift[:, :, 0, 0]
    assert abs(s.mean().item()) < 0.005 and s.std().item() == pytest.approx(0.1, rel=0.03)
    scale = jitter(torch.ones(n, c, 2, 2), _gen(4), scale_sd=0.1, shift_sd=0.0)[:, :, 0, 0]
    assert scale.mean().item() == pytest.approx(1.0, abs=0.005)
    assert scale.std().item() == pytest.approx(0.1, rel=0.03)
    # channels are drawn independently
    corr = torch.corrcoef(s[:, :2].T)[0, 1].item()
    assert abs(corr) < 0.05
    half = jitter(torch.zeros(n, c, 1, 1), _gen(5), 0.1, 0.1, p=0.5)[:, 0, 0, 0]
    assert (half == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)


def test_zoom_shape_and_scale_one_is_identity():
    x = torch.randn(5, 6, 32, 32)
    out = zoom(x, _gen(0), side=torch.ones(5))
    assert out.shape == x.shape and torch.allclose(out, x, atol=1e-5)
    z = zoom(x, _gen(0), min_side=0.5)
    assert z.shape == x.shape and not torch.allclose(z, x, atol=1e-3)


def test_zoom_half_side_magnifies_a_quarter_of_the_image():
    # A left-to-right ramp: a crop of half the side spans half of the ramp's range.
    ramp = torch.linspace(0, 1, 64).expand(1, 1, 64, 64).repeat(200, 1, 1, 1)
    out = zoom(ramp, _gen(1), side=torch.full((200,), 0.5))
    spans = out[:, 0, 32, -1] - out[:, 0, 32, 0]
    assert torch.allclose(spans, torch.full((200,), 0.5), atol=0.03)
    assert out.min() >= 0 and out.max() <= 1      # the crop stays inside the image


def test_soft_cross_entropy_matches_torch_on_hard_labels():
    logits = torch.randn(16, 9)
    y = torch.randint(0, 9, (16,))
    for eps in (0.0, 0.1):
        ref = F.cross_entropy(logits, y, label_smoothing=eps)
        assert soft_cross_entropy(logits, y, eps).item() == pytest.approx(ref.item(), rel=1e-5)
        onehot = F.one_hot(y, 9).float()
        assert soft_cross_entropy(logits, onehot, eps).item() == pytest.approx(ref.item(),
                                                                                rel=1e-5)


def test_soft_cross_entropy_of_a_mixed_target_is_the_mix_of_the_losses():
    logits = torch.randn(4, 5)
    a, b = torch.tensor([0, 1, 2, 3]), torch.tensor([4, 3, 2, 1])
    lam = torch.tensor([0.3, 0.5, 0.9, 0.0])[:, None]
    soft = lam * F.one_hot(a, 5) + (1 - lam) * F.one_hot(b, 5)
    per = lam[:, 0] * F.cross_entropy(logits, a, reduction="none") + \
        (1 - lam[:, 0]) * F.cross_entropy(logits, b, reduction="none")
    assert soft_cross_entropy(logits, soft).item() == pytest.approx(per.mean().item(), rel=1e-5)


def test_batch_augment_from_config_and_its_errors():
    off = BatchAugment.from_params()
    assert not off.active
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    imgs, t = off(x, y, 4, _gen())
    assert torch.equal(imgs, x) and torch.equal(t, F.one_hot(y, 4).float())
    on = BatchAugment.from_params(zoom=True, jitter={"p": 0.5, "scale_sd": 0.2},
                                  cutmix={"beta": 1.0})
    assert on.active and on.p_zoom == 1.0 and on.p_jitter == 0.5 and on.scale_sd == 0.2
    imgs, t = on(x, y, 4, _gen())
    assert imgs.shape == x.shape and t.shape == (6, 4)
    assert torch.allclose(t.sum(1), torch.ones(6))
    with pytest.raises(ConfigError, match=r"stages.data_params.cutmix: unknown key\(s\) \['alpha'\]"):
        BatchAugment.from_params(cutmix={"alpha": 1.0})
    with pytest.raises(ConfigError, match=r"stages.data_params.zoom.min_side 0.0"):
        BatchAugment.from_params(zoom={"min_side": 0.0})
    with pytest.raises(ConfigError, match=r"stages.data_params.jitter.p 'x': need a number"):
        BatchAugment.from_params(jitter={"p": "x"})
    with pytest.raises(ConfigError, match=r"stages.data_params.cutmix: 0.5; null/false"):
        BatchAugment.from_params(cutmix=0.5)
