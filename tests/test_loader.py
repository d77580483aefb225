"""The loader against a plain numpy reference read from the zarr store, on the tiny store.

Both backends run here: DALI as a CPU pipeline (device_id=None) and the torch
fallback.  Every check compares values: pixels to `(pixel - mean) / std` of
the zarr store, rows and labels to the selection.  Where nvidia.dali is not
installed, the DALI cases skip (`DALI` / `needs_dali`) and the rest still run.
"""
import numpy as np
import pandas as pd
import pytest
import torch

from shards import LoaderSpec, make_loader, open_store
from shards.augment import all_dihedral, dihedral_chw, normalize
from shards.layout import NORM_MODES
from shards.selection import rank_batches

try:
    import nvidia.dali  # noqa: F401
    HAVE_DALI = True
except ImportError:
    HAVE_DALI = False
needs_dali = pytest.mark.skipif(not HAVE_DALI, reason="nvidia.dali is not installed")
DALI = pytest.param("dali", marks=needs_dali)
BACKENDS = ("dali", "torch")  # for tests comparing the two: mark them needs_dali
SUBSET = (1, 2, 3, 5, 6)


@pytest.fixture(scope="module")
def store(tiny_store):
    return open_store(tiny_store)


@pytest.fixture(scope="module")
def pixels(store):
    return store.pixels[:]


def run(loader, epoch=0):
    """One epoch as numpy: images, labels, rows, and the batch sizes."""
    loader.set_epoch(epoch)
    xs, ys, rs, sizes = [], [], [], []
    for x, y, r in loader:
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and r.dtype == torch.int64
        xs.append(x.numpy()), ys.append(y.numpy()), rs.append(r.numpy()), sizes.append(len(r))
    assert len(sizes) == len(loader)
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(rs), sizes


def reference(store, pixels, rows, norm, channels=SUBSET):
    table = store.norm(norm)
    return np.stack([normalize(pixels[r], table[r], channels) for r in rows])


def wells_of(store, split):
    return store.sites[store.sites.split == split].drop_duplicates("id_code")


@needs_dali
@pytest.mark.parametrize("norm", NORM_MODES)
def test_backends_equal_numpy_reference(tiny_store, store, pixels, norm):
    out = {}
    for backend in BACKENDS:
        spec = LoaderSpec(channels="[1,2,3,5,6]", norm=norm, sites="two", batch_size=16,
                          backend=backend, num_workers=2)
        loader = make_loader(tiny_store, "all", spec)
        x, y, r, sizes = run(loader)
        assert x.shape == (len(store.sites), 5, 64, 64)
        assert sorted(r) == list(range(len(store.sites)))  # every site exactly once
        assert sizes == [16] * (len(r) // 16) + [len(r) % 16] * bool(len(r) % 16)
        np.testing.assert_allclose(x, reference(store, pixels, r, norm), atol=1e-4, rtol=0)
        np.testing.assert_array_equal(y, store.sites.sirna.to_numpy()[r])
        out[backend] = x, r
    np.testing.assert_array_equal(out["dali"][1], out["torch"][1])  # same order, unshuffled
    np.testing.assert_allclose(out["dali"][0], out["torch"][0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", [DALI, "torch"])
def test_none_norm_is_pixel_over_255(tiny_store, pixels, backend):
    spec = LoaderSpec(channels=[4], norm="none", sites="one", batch_size=64, backend=backend)
    x, _, r, _ = run(make_loader(tiny_store, "test", spec))
    np.testing.assert_allclose(x[:, 0], pixels[r, :, :, 3] / 255.0, atol=1e-6)


def dihedral_index(out, ref, dropped_value):
    """Which of the 8 dihedral transforms of `ref` (C, H, W) `out` is, and the channel
    channel dropout set to 0 in pixel space (None if none): that channel must read
    `dropped_value[c]` = -mean/std everywhere.  AssertionError if it is neither."""
    for k, t in enumerate(all_dihedral(ref)):
        differ = [c for c in range(len(out)) if not np.allclose(out[c], t[c], atol=1e-4)]
        if not differ:
            return k, None
        if len(differ) == 1 and np.allclose(out[differ[0]], dropped_value[differ[0]],
                                            atol=1e-5):
            return k, differ[0]
    raise AssertionError("output is no dihedral transform (or channel-dropped copy) of its site")


@pytest.mark.parametrize("backend", [DALI, "torch"])
def test_augment_is_dihedral_or_channel_dropped(tiny_store, store, pixels, backend):
    """The reference's ChannelDropout: one channel set to 0 in pixel space, before
    normalization, so it reads -mean/std of that site and channel (issue 12 #4)."""
    spec = LoaderSpec(channels=SUBSET, norm="experiment", sites="two", batch_size=32,
                      augment=True, channel_dropout=0.3, backend=backend, num_workers=2, seed=3)
    loader = make_loader(tiny_store, "all", spec)
    x, _, r, _ = run(loader)
    ref = reference(store, pixels, r, "experiment")
    stats = store.norm("experiment")[:, [c - 1 for c in SUBSET]]
    seen, dropped = np.zeros(8, int), 0
    for out, want, row in zip(x, ref, r):
        # the synthetic sites are asymmetric: their 8 transforms differ, so a match is unique
        assert len({t.tobytes() for t in all_dihedral(want)}) == 8
        fill = -stats[row, :, 0] / stats[row, :, 1]
        assert (np.abs(fill) > 0.1).all()  # a dropped channel is not 0 after normalization
        k, zero = dihedral_index(out, want, fill)
        seen[k] += 1
        dropped += zero is not None
    assert (seen > 0).all(), f"transform counts {seen}: all 8 dihedral transforms must occur"
    assert 0.2 < dropped / len(x) < 0.4  # p = 0.3 over 556 samples
    x2, _, r2, _ = run(loader, epoch=1)
    assert not np.array_equal(r, r2)  # augment implies shuffle: a new order per epoch


def test_dihedral_helper_is_the_group_of_the_square():
    a = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)  # (C, H, W), asymmetric
    got = {t.tobytes() for t in all_dihedral(a)}
    rotations = [np.rot90(a, k, axes=(1, 2)) for k in range(4)]
    want = {np.ascontiguousarray(m).tobytes() for r in rotations for m in (r, r[:, :, ::-1])}
    assert got == want and len(got) == 8
    hwc = a.transpose(1, 2, 0)
    np.testing.assert_array_equal(dihedral_chw(hwc, 1, 0, 0), a[:, :, ::-1])
    np.testing.assert_array_equal(dihedral_chw(hwc, 0, 1, 1), a[:, ::-1].transpose(0, 2, 1))


@pytest.mark.parametrize("backend", [DALI, "torch"])
def test_selection_yields_its_rows_and_labels(tiny_store, store, tmp_path, backend):
    wells = wells_of(store, "train").iloc[::3]
    sel = pd.DataFrame({"id_code": wells.id_code, "klass": np.arange(len(wells)) * 7 + 1})
    spec = LoaderSpec(sites="two", batch_size=5, label_column="klass", backend=backend,
                      shuffle=True)
    loader = make_loader(tiny_store, sel, spec)
    _, y, r, _ = run(loader)
    sites = store.sites.set_index("row")
    assert sorted(r) == sorted(store.sites[store.sites.id_code.isin(wells.id_code)].row)
    label_of = dict(zip(sel.id_code, sel.klass))
    np.testing.assert_array_equal(y, [label_of[sites.id_code[i]] for i in r])

    csv = tmp_path / "sel.csv"
    sel[["id_code"]].to_csv(csv, index=False)  # no labels: -1
    _, y, r2, _ = run(make_loader(tiny_store, str(csv), LoaderSpec(sites="two", backend=backend)))
    assert sorted(r2) == sorted(r) and (y == -1).all()


def test_split_name_selects_that_split_with_sites_table_labels(tiny_store, store):
    _, y, r, _ = run(make_loader(tiny_store, "test", LoaderSpec(sites="one", site=2,
                                                                 batch_size=8)))
    test = store.sites[store.sites.split == "test"]
    assert sorted(r) == sorted(test[test.site == 2].row)
    np.testing.assert_array_equal(y, store.sites.sirna.to_numpy()[r])


@pytest.mark.parametrize("backend,world_size,drop_last",
                         [pytest.param("dali", 2, False, marks=needs_dali), ("torch", 3, False),
                          pytest.param("dali", 3, True, marks=needs_dali)])
def test_ranks_are_disjoint_cover_and_have_equal_batch_counts(tiny_store, store, backend,
                                                              world_size, drop_last):
    n_wells = store.sites.id_code.nunique()
    parts, counts = [], []
    for rank in range(world_size):
        spec = LoaderSpec(batch_size=16, augment=True, rank=rank, world_size=world_size,
                          backend=backend, drop_last=drop_last, seed=5)
        loader = make_loader(tiny_store, "all", spec)
        _, _, r, sizes = run(loader, epoch=2)
        parts.append(r), counts.append(len(sizes))
        assert min(sizes) > 0 and (not drop_last or set(sizes) == {16})
    assert len(set(counts)) == 1
    rows = np.concatenate(parts)
    assert len(set(rows)) == len(rows)  # disjoint
    wells = store.sites.id_code.to_numpy()[rows]
    assert len(set(wells)) == len(wells)  # random site mode: one site per well
    if drop_last:
        assert len(rows) == n_wells // (world_size * 16) * world_size * 16
    else:
        assert len(rows) == n_wells  # covers the selection


def test_rank_batches_every_case():
    for n in range(1, 40):
        for w in range(1, 5):
            for b in range(1, 6):
                order = np.arange(100, 100 + n)
                try:
                    got = [rank_batches(order, k, w, b, False) for k in range(w)]
                except ValueError:
                    assert n < w or (b == 1 and n % w)  # only when impossible without repeats
                    continue
                rows = np.concatenate([m for m, _ in got])
                assert sorted(rows) == list(order)
                counts = {sum(len(p) for p in pieces) for _, pieces in got}
                assert len(counts) == 1
                for mine, pieces in got:
                    sizes = [s for p in pieces for s in p]
                    assert sum(sizes) == len(mine) and min(sizes) > 0 and max(sizes) <= b
                    assert all(sum(p) == b for p in pieces[:-1])  # reader batches stay whole


def test_site_modes(tiny_store, store):
    sites = store.sites.set_index("row")
    loader = make_loader(tiny_store, "train", LoaderSpec(sites="random", batch_size=16, seed=1))
    per_epoch = [run(loader, e)[2] for e in range(3)]
    n_wells = store.sites[store.sites.split == "train"].id_code.nunique()
    for r in per_epoch:
        assert len(r) == n_wells and sites.id_code[r].nunique() == n_wells
    drawn = np.concatenate(per_epoch)
    assert set(sites.site[drawn]) == {1, 2}
    assert len(set(drawn)) > n_wells  # wells change site between epochs
    np.testing.assert_array_equal(np.sort(run(loader, 1)[2]), np.sort(per_epoch[1]))  # replayable

    r = run(make_loader(tiny_store, "train", LoaderSpec(sites="two", batch_size=16)))[2]
    assert sorted(r) == sorted(store.sites[store.sites.split == "train"].row)
    r = run(make_loader(tiny_store, "train", LoaderSpec(sites="one", site=2,
                                                         batch_size=16)))[2]
    assert set(sites.site[r]) == {2} and len(r) == n_wells


def test_shuffled_batches_mix_experiments_and_plates(tiny_store, store):
    loader = make_loader(tiny_store, "train", LoaderSpec(sites="two", batch_size=16,
                                                         shuffle=True))
    sites = store.sites.set_index("row")
    n_train = int((store.sites.split == "train").sum())
    full = 0
    for _, _, r in loader:
        if len(r) == 16:
            full += 1
            assert sites.experiment[r.numpy()].nunique() >= 2
            assert (sites.experiment[r.numpy()] + sites.plate[r.numpy()].astype(str)).nunique() >= 3
    # every batch but the last is full: the checks above ran on all of them
    assert n_train >= 3 * 16 and full == n_train // 16


def halve_by_hand(n=64):
    """(n/2, n) weights of an antialiased bilinear halving: each output pixel is the tent
    of half-width 2 input pixels over its centre, i.e. 1/8, 3/8, 3/8, 1/8 of four inputs;
    at the borders the missing input is dropped and the rest renormalized (3, 3, 1 / 7)."""
    a = np.zeros((n // 2, n))
    for i in range(n // 2):
        for j, w in zip(range(2 * i - 1, 2 * i + 3), (1, 3, 3, 1)):
            if 0 <= j < n:
                a[i, j] = w
    return a / a.sum(1, keepdims=True)


def test_the_hand_reference_halves_a_ramp_and_keeps_a_constant():
    a = halve_by_hand()
    ramp = np.arange(64.0)
    want = np.arange(32) * 2 + 0.5            # the mean of each pair of inputs...
    want[0], want[-1] = 5 / 7, (61 + 3 * 62 + 3 * 63) / 7   # ...but at the renormalized borders
    np.testing.assert_allclose(a @ ramp, want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(a @ np.full(64, 0.7), 0.7, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", [DALI, "torch"])
def test_resize_to_half_is_the_filter_by_hand(tiny_store, store, pixels, backend):
    spec = LoaderSpec(channels=SUBSET, sites="one", image_size=32, batch_size=32,
                      backend=backend)
    x, _, r, _ = run(make_loader(tiny_store, "test", spec))
    a = halve_by_hand()
    want = np.einsum("ij,bcjk,lk->bcil", a, reference(store, pixels, r, "site"), a)
    np.testing.assert_allclose(x, want, rtol=0, atol=1e-4)


def test_resize_keeps_a_constant_image_constant():
    from shards.loader import _resize
    for size in ((32, 32), (40, 40), (80, 80)):
        y = _resize(torch.full((2, 5, 64, 64), 0.7), size)
        assert tuple(y.shape) == (2, 5) + size
        np.testing.assert_allclose(y.numpy(), 0.7, rtol=0, atol=1e-6)


@needs_dali
def test_resize_agrees_between_backends_and_native_size_is_exact(tiny_store, store, pixels):
    got = {}
    for backend in BACKENDS:
        spec = LoaderSpec(channels=SUBSET, sites="one", image_size=40, batch_size=32,
                          backend=backend)
        loader = make_loader(tiny_store, "test", spec)
        x, _, r, _ = run(loader)
        assert x.shape[1:] == (5, 40, 40)
        got[backend] = x, r
    np.testing.assert_array_equal(got["torch"][1], got["dali"][1])
    np.testing.assert_allclose(got["torch"][0], got["dali"][0], atol=1e-5)
    # a resize, not the native pixels cropped or left alone
    assert not np.allclose(got["torch"][0][..., :40, :40],
                           reference(store, pixels, r, "site")[..., :40, :40], atol=1e-2)
    x, _, r, _ = run(make_loader(tiny_store, "test", LoaderSpec(
        channels=SUBSET, sites="one", image_size=64, batch_size=32)))
    np.testing.assert_allclose(x, reference(store, pixels, r, "site"), atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", [DALI, "torch"])
def test_rank_one_batch_short_splits_its_last_batch(tiny_store, store, backend):
    """17 wells on 2 ranks in batches of 4: 9 + 8 samples, i.e. 3 and 2 batches; the
    second rank halves its last batch, so both take 3 steps and no sample repeats."""
    sel = pd.DataFrame({"id_code": store.sites.id_code.unique()[:17]})
    got = [run(make_loader(tiny_store, sel, LoaderSpec(batch_size=4, rank=k, world_size=2,
                                                       backend=backend))) for k in range(2)]
    assert [g[3] for g in got] == [[4, 4, 1], [4, 2, 2]]
    rows = np.concatenate([g[2] for g in got])
    assert len(set(rows)) == 17 and set(store.sites.id_code[rows]) == set(sel.id_code)
