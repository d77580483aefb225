"""Each fact of the 1st place's recipe (maciej-sypetkowski/kaggle-rcic-1st) as this project
runs it: the loss, CutMix, zoom before per-sample normalization, the pseudo-label mechanics,
the learning-rate restart; and the device path of `deliver` on CPU tensors."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from shards.loader import Delivery, _deliver_cpu, deliver, deliver_batched, zoom_boxes
from shards.plate_groups import Groups
from train.config_schema import ConfigError
from train.schedule import CosineSegments
from train.techniques.batch_augment import BatchAugment, cutmix, cutmix_box
from train.techniques.losses import arcface_loss, first_place_loss
from train.techniques.pseudo_labels import PseudoSchedule, select_labels


# ------------------------------------------------------------------ the loss

def test_loss_is_0_8_ce_plus_0_1_arcface_on_known_logits():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    cosine = torch.tensor([[0.8, 0.1, -0.2], [0.3, 0.6, 0.0]])
    y = torch.tensor([0, 1])
    # by hand: CE of each row; ArcFace: the target's cosine becomes cos(acos(c) + 0.5), x30
    ce = -np.mean([math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-1))),
                   math.log(math.exp(1.5) / (math.exp(0.5) + math.exp(1.5) + 1))])
    rows = []
    for c, t in ((cosine[0].tolist(), 0), (cosine[1].tolist(), 1)):
        z = [30 * (math.cos(math.acos(c[j]) + 0.5) if j == t else c[j]) for j in range(3)]
        rows.append(-(z[t] - math.log(sum(math.exp(v) for v in z))))
    arc = np.mean(rows)
    got = first_place_loss(logits, cosine, y, weight=0.2, s=30.0, m=0.5)
    assert got.item() == pytest.approx(0.8 * ce + 0.1 * arc, rel=1e-5)
    assert arcface_loss(cosine, y).item() == pytest.approx(arc / 2, rel=1e-5)
    assert first_place_loss(logits, None, y, 0.2, 30, 0.5).item() == pytest.approx(ce, rel=1e-6)


def test_soft_targets_mix_the_margin_as_the_first_places_code():
    cosine = torch.tensor([[0.7, 0.2, -0.1]])
    t = torch.tensor([[0.75, 0.25, 0.0]])
    phi = [math.cos(math.acos(c) + 0.5) for c in cosine[0].tolist()]
    z = [30 * (t[0, j].item() * phi[j] + (1 - t[0, j].item()) * cosine[0, j].item())
         for j in range(3)]
    lse = math.log(sum(math.exp(v) for v in z))
    want = -sum(t[0, j].item() * (z[j] - lse) for j in range(3)) / 2
    assert arcface_loss(cosine, t).item() == pytest.approx(want, rel=1e-5)


# ------------------------------------------------------------------ CutMix

def test_cutmix_is_one_box_per_batch_and_mixes_the_cell_type_by_its_area():
    g = torch.Generator().manual_seed(3)
    x = torch.arange(8, dtype=torch.float32)[:, None, None, None].expand(8, 2, 16, 16).clone()
    targets = F.one_hot(torch.arange(8), 10).float()
    cell = F.one_hot(torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]), 4).float()
    out, t, c = cutmix(x, targets, g, 1.0, cell)
    changed = (out != x).any(dim=1)                       # (B, H, W) pixels pasted
    boxes = {tuple(torch.nonzero(m).min(0).values.tolist() + torch.nonzero(m).max(0).values.tolist())
             for m in changed if m.any()}
    assert len(boxes) == 1                                # the same box in every mixed sample
    r1, c1, r2, c2 = boxes.pop()
    share = (r2 - r1 + 1) * (c2 - c1 + 1) / 256
    src = out[:, 0, r1, c1].long()                        # which sample each box came from
    for i in range(8):
        own = 1 - share if src[i] != i else 1.0
        assert t[i, i].item() == pytest.approx(own, abs=1e-6)
        assert t[i].sum().item() == pytest.approx(1.0)
        assert torch.allclose(c[i], own * cell[i] + (1 - own) * cell[src[i]], atol=1e-6) \
            if src[i] != i else torch.equal(c[i], cell[i])


def test_cutmix_box_is_the_first_places_arithmetic():
    # lam 0.75 -> sides half the image's, centred at (row, col), clipped
    assert cutmix_box(64, 64, 0.75, 32.0, 32.0) == (16, 48, 16, 48)
    assert cutmix_box(64, 64, 0.75, 4.0, 60.0) == (0, 20, 44, 64)


def test_batch_augment_keys_and_p0_leaves_the_batch():
    aug = BatchAugment.from_params(cutmix={"p": 0.0}, jitter=None)
    x = torch.randn(4, 3, 8, 8)
    out, t, _ = aug(x, torch.tensor([0, 1, 2, 3]), 5, torch.Generator().manual_seed(0))
    assert torch.equal(out, x) and torch.equal(t, F.one_hot(torch.arange(4), 5).float())
    with pytest.raises(ConfigError, match=r"cutmix: unknown key\(s\) \['alpha'\]"):
        BatchAugment.from_params(cutmix={"alpha": 1})


# ------------------------------------------------------------------ zoom, normalization

def _delivery(images, mean=None, std=None, zoom_p=0.0, drop=0.0, size=None):
    n = images.shape[0]
    return Delivery(mean=mean, std=std, labels=torch.zeros(n, dtype=torch.int64),
                    channels=(1, 2, 3), image_size=size, channel_dropout=drop,
                    device=torch.device("cpu"), zoom_p=zoom_p, zoom_min_side=0.5)


def test_zoom_crops_in_pixel_space_before_normalizing_by_the_crops_own_statistics():
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (4, 6, 32, 32), dtype=torch.uint8)
    out, _, _ = deliver(img, torch.arange(4), _delivery(img, zoom_p=1.0), g)
    boxes = zoom_boxes(4, 32, 32, 1.0, 0.5, torch.Generator().manual_seed(0))
    for k, (top, left, side) in enumerate(boxes):
        assert 16 <= side <= 32
        crop = img[k, :3, top:top + side, left:left + side].float()
        idx = (torch.arange(32) * side // 32)                 # nearest neighbour
        big = crop[:, idx][:, :, idx]
        want = (big - big.mean((1, 2), keepdim=True)) / (big.std((1, 2), keepdim=True) + 1e-8)
        assert torch.allclose(out[k], want, atol=1e-5)
        assert out[k].mean((1, 2)).abs().max() < 1e-5       # statistics of the crop, not the site


def test_the_device_path_of_deliver_is_the_cpu_paths_arithmetic():
    """The GPU branch (deliver_batched) on CPU tensors: dropout, zoom, resize, both
    normalizations, against the per-site CPU path."""
    g = torch.Generator().manual_seed(1)
    img = torch.randint(0, 256, (5, 6, 32, 32), dtype=torch.uint8)
    mean, std = torch.rand(5, 3) * 100, torch.rand(5, 3) * 30 + 1
    drop = torch.tensor([-1, 0, -1, 2, -1])
    boxes = zoom_boxes(5, 32, 32, 0.6, 0.5, g)
    assert any(b is None for b in boxes) and any(b is not None for b in boxes)
    for m, s in ((mean, std), (None, None)):
        for size in ((32, 32), (16, 16)):
            a = _deliver_cpu(img, m, s, (1, 2, 3), size, drop, boxes)
            b = deliver_batched(img, m, s, (1, 2, 3), size, drop, boxes)
            assert torch.allclose(a, b, atol=1e-4)
    # and it is what it says: the fixed statistics subtracted and divided, not added
    b = deliver_batched(img, mean, std, (1, 2, 3), (32, 32), torch.full((5,), -1), None)
    want = (img[:, :3].float() - mean[:, :, None, None]) / std[:, :, None, None]
    assert torch.allclose(b, want, atol=1e-4)


# ------------------------------------------------------------------ pseudo labels

def _groups():
    members = (np.array([0, 1, 2, 3]), np.array([4, 5, 6, 7]))
    return Groups(members=members, plate_numbers=frozenset({1, 2}),
                  distinct_per_experiment=True, train_plates=pd.DataFrame())


def test_pseudo_labels_rank_globally_within_the_plate_group_and_never_twice():
    wells = pd.DataFrame({"experiment": ["E-01"] * 3 + ["E-02"] * 3,
                          "plate": [1, 1, 1, 1, 1, 1], "id_code": list("abcdef")})
    table = {("E-01", 1): 0, ("E-02", 1): 1}
    logits = np.full((6, 8), 0.0)
    logits[0, [1, 5]] = [9.0, 20.0]      # a: 5 is outside its group -> label 1, margin 9
    logits[1, [1, 2]] = [8.0, 1.0]       # b: 1 too (margin 7): same siRNA -> skipped
    logits[2, [3]] = [2.0]               # c: margin 2
    logits[3, [6]] = [7.5]               # d (plate 2): margin 7.5, ranks between a and b
    logits[4, [6, 7]] = [3.0, 2.5]       # e: 6 again on its plate -> skipped
    logits[5, [4]] = [1.0]
    none = pd.DataFrame({"experiment": [], "plate": [], "label": []})
    out = select_labels(logits, wells, table, _groups(), none, n=5)
    # margins a 9, d 7.5, b 7, c 2, f 1, e 0.5: the first five globally, b skipped (its
    # siRNA 1 was given to a on the plate this round), not replaced: 4 labels for n = 5
    assert out["id_code"].tolist() == ["a", "d", "c", "f"]
    assert out["sirna"].tolist() == [1, 6, 3, 4]
    assert all(s in _groups().members[table[(e, p)]] for e, p, s in
               zip(out["experiment"], out["plate"], out["sirna"]))
    # frozen: a later round masks what this plate already got, and skips labelled wells
    taken = pd.DataFrame({"experiment": out["experiment"], "plate": out["plate"],
                          "label": out["sirna"]})
    rest = wells[~wells["id_code"].isin(out["id_code"])].reset_index(drop=True)
    assert rest["id_code"].tolist() == ["b", "e"]
    again = select_labels(logits[[1, 4]], rest, table, _groups(), taken, n=2)
    # b: 1 and 3 are taken on its plate -> 2; e: 6 and 4 taken -> 7
    assert dict(zip(again["id_code"], again["sirna"])) == {"b": 2, "e": 7}


def test_the_quota_is_0_6x_plus_0_4_of_the_test_wells():
    s = PseudoSchedule.from_params({"start_epoch": 90, "size": [0.6, 0.4]})
    assert s.quota(89, 130, 1000) == 0
    assert s.quota(90, 130, 1000) == round((0.6 / 41 + 0.4) * 1000)      # x = 1/41
    assert s.quota(129, 130, 1000) == round((0.6 * 40 / 41 + 0.4) * 1000)  # x = 40/41
    with pytest.raises(ConfigError, match="start_epoch 0"):
        PseudoSchedule.from_params({"start_epoch": 0})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['full_epoch'\]"):
        PseudoSchedule.from_params({"full_epoch": 3})


def test_the_learning_rate_restarts_when_pseudo_labelling_begins():
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    sched = CosineSegments(opt, 130, [1.5e-4, 90, 6e-5, 150, 0])
    lr = lambda e: sched.value(e)  # noqa: E731
    assert lr(0) == pytest.approx(1.5e-4)
    assert lr(45) == pytest.approx(0.75e-4)
    assert lr(89.99) < 1e-9
    assert lr(90) == pytest.approx(6e-5)                                   # the restart
    assert lr(129) == pytest.approx(6e-5 * (math.cos(39 / 60 * math.pi) + 1) / 2)
    sched.position(45.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.75e-4)
