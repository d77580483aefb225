"""The reference's training augmentations on both backends (issue 12 #4): the shear
(IAAAffine(shear=10), p=0.5) and the backends agreeing sample by sample on the same
plan (same seed, epoch and rank).

Tolerance of the shear: DALI's `warp_affine` and the torch fallback's
`grid_sample` both interpolate bilinearly in float32 and round to uint8, so a
pixel may differ by one level (1/255 with norm="none") where the two roundings
of the same value fall on either side of .5; anything else must be equal.
Without shear the outputs are equal to float rounding (flips are exact).
"""
import math

import numpy as np
import pytest
import scipy.ndimage

from shards import LoaderSpec, make_loader, open_store
from shards.augment import all_dihedral, draw_plan, shear_hwc, shear_matrix

try:
    import nvidia.dali  # noqa: F401
    HAVE_DALI = True
except ImportError:
    HAVE_DALI = False
needs_dali = pytest.mark.skipif(not HAVE_DALI, reason="nvidia.dali is not installed")


def epoch(loader, e):
    loader.set_epoch(e)
    xs, rs = zip(*[(x.numpy(), r.numpy()) for x, _, r in loader])
    return np.concatenate(xs), np.concatenate(rs)


@pytest.mark.parametrize("angle", [-10.0, -3.5, 7.0, 10.0])
def test_shear_is_imgaugs_map_about_the_centre(angle):
    """Against scipy's affine_transform (pixel centres at integers, edges repeated):
    imgaug's Affine(shear=θ) maps p to c + A (p - c), A = [[1, -sin θ], [0, cos θ]] in
    (x, y), c the centre, so the output at p reads the input at c + A^-1 (p - c)."""
    rng = np.random.default_rng(0)
    h, w = 40, 56
    hwc = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
    t = math.radians(angle)
    inv_xy = np.linalg.inv([[1.0, -math.sin(t)], [0.0, math.cos(t)]])
    inv_yx = inv_xy[::-1, ::-1]  # scipy indexes (row, col) = (y, x)
    c = np.array([h / 2 - 0.5, w / 2 - 0.5])
    want = np.stack([scipy.ndimage.affine_transform(
        hwc[..., k].astype(np.float64), inv_yx, offset=c - inv_yx @ c, order=1, mode="nearest")
        for k in range(3)], -1)
    got = shear_hwc(hwc, angle)
    assert np.abs(got.astype(float) - want).max() <= 0.5 + 1e-3  # rounding of float32 only
    # the centre stays put, a row away from it slides sideways by sin θ per row
    np.testing.assert_allclose(shear_matrix(angle, h, w) @ [w / 2, h / 2, 1], [w / 2, h / 2],
                               atol=1e-5)


def test_plan_is_the_seeds_alone_and_shears_at_p():
    a = draw_plan(4000, seed=1, epoch=2, rank=0, shear_deg=10, shear_p=0.5)
    b = draw_plan(4000, seed=1, epoch=2, rank=0, shear_deg=10, shear_p=0.5)
    np.testing.assert_array_equal(a["shear"], b["shear"])
    sheared = a["shear"] != 0
    assert 0.46 < sheared.mean() < 0.54 and np.abs(a["shear"]).max() <= 10
    assert a["shear"][sheared].min() < -9 and a["shear"][sheared].max() > 9
    assert 0.47 < a["flips"].mean() < 0.53
    other = draw_plan(4000, seed=1, epoch=3, rank=0, shear_deg=10, shear_p=0.5)
    assert not np.array_equal(a["flips"], other["flips"])
    assert not draw_plan(100, 1, 2, 0, shear_deg=10, shear_p=0.0)["shear"].any()


@needs_dali
def test_backends_agree_on_the_same_plan_with_shear(tiny_store):
    store = open_store(tiny_store)
    got = {}
    for backend in ("dali", "torch"):
        spec = LoaderSpec(norm="none", sites="two", batch_size=32, augment=True, shear_deg=10,
                          shear_p=0.5, backend=backend, seed=3, num_workers=2)
        got[backend] = epoch(make_loader(tiny_store, "all", spec), 1)
    (a, ra), (b, rb) = got["dali"], got["torch"]
    np.testing.assert_array_equal(ra, rb)
    diff = np.abs(a - b) * 255
    assert diff.max() <= 1 + 1e-3 and (diff > 0.5).mean() < 1e-3
    # about half the samples are sheared: no dihedral transform of their site
    pixels = store.pixels[:]
    plain = sum(any(np.allclose(x, t / 255, atol=1e-6) for t in all_dihedral(
        pixels[r].transpose(2, 0, 1))) for x, r in zip(a, ra))
    assert 0.4 < 1 - plain / len(a) < 0.6


@needs_dali
def test_backends_agree_exactly_without_shear(tiny_store):
    got = {}
    for backend in ("dali", "torch"):
        spec = LoaderSpec(channels=(1, 2, 3, 5, 6), norm="experiment", sites="random",
                          batch_size=16, augment=True, channel_dropout=0.5, backend=backend,
                          seed=7, num_workers=2)
        got[backend] = epoch(make_loader(tiny_store, "train", spec), 4)
    np.testing.assert_array_equal(got["dali"][1], got["torch"][1])
    np.testing.assert_allclose(got["dali"][0], got["torch"][0], atol=1e-5, rtol=0)
