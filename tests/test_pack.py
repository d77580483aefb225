"""prep shards on the tiny preset: every byte and statistic checked against independent readings."""
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from prep.pack import KILL_AFTER_ENV, pack
from prep.preview import composite, preview
from shards.layout import CHANNELS, png_path, sample_key
from shards.manifest import sha256_file
from shards.store import StoreError, open_store

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _shard_mb(store_dir):
    """The shard size the session's tiny store was packed with (conftest chooses it)."""
    return json.load(open(os.path.join(store_dir, "manifest.json")))["prep"]["shard_size_mb"]


def _source(data_dir, r):
    """One site read straight from its six PNGs with pillow."""
    return np.stack([np.array(Image.open(png_path(data_dir, r.split, r.experiment, r.plate,
                                                  r.well, r.site, c))) for c in CHANNELS], -1)


def _tar_samples(path):
    """{key: {ext: bytes}} of a tar, read with the standard library."""
    out = {}
    with tarfile.open(path) as tf:
        for m in tf:
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


@pytest.fixture(scope="module")
def store(tiny_store):
    return open_store(tiny_store)


def test_store_pixels_equal_source_pngs(store, tiny_data):
    pixels = store.pixels[:]
    assert pixels.shape == (len(store.sites), 64, 64, 6) and pixels.dtype == np.uint8
    for r in store.sites.itertuples():
        np.testing.assert_array_equal(pixels[r.row], _source(tiny_data, r), err_msg=r.id_code)


def test_sites_table_is_the_metadata_table(store, tiny_data):
    from shards.metadata import load_sites
    expected = load_sites(tiny_data)
    assert store.sites.equals(expected)
    assert set(store.sites["split"]) == {"train", "test"}
    assert (store.sites["well_type"] != "treatment").any()  # the control sets are packed too


def test_shard_samples_equal_store(store):
    pixels = store.pixels[:]
    sites = store.sites
    seen = []
    for entry, path in zip(store.shards(), store.shard_paths()):
        samples = _tar_samples(path)
        assert len(samples) == entry["count"]
        assert sha256_file(path) == entry["sha256"]
        assert os.path.getsize(path) == entry["bytes"]
        wells = set()
        for key, members in samples.items():
            assert set(members) == {"pixels", "row", "json"}
            row = int(np.frombuffer(members["row"], "<i8")[0])
            r = sites.iloc[row]
            assert key == sample_key(r["id_code"], r["site"])
            assert r["split"] == entry["split"]
            assert members["pixels"] == pixels[row].tobytes()
            meta = json.loads(members["json"])
            # every sites-table column but sirna_name, which the tars leave out
            # so that both source layouts give the same bytes
            assert meta == {**{k: (v.item() if hasattr(v, "item") else v)
                               for k, v in r.items() if k != "sirna_name"},
                            "shape": [64, 64, 6]}
            wells.add(r["id_code"])
            seen.append(row)
        # both sites of every well of this shard are in this shard
        assert sum(sites["id_code"].isin(wells)) == len(samples)
    assert sorted(seen) == list(range(len(sites)))
    # several shards per split, and a shard mixes experiments (wells are shuffled)
    assert len(store.shards("train")) >= 3 and len(store.shards("test")) >= 3
    first = _tar_samples(store.shard_paths("train")[0])
    assert len({k.split("_")[0] for k in first}) > 1


def test_stats_equal_numpy(store):
    px = store.pixels[:].astype(np.float64)
    flat = px.reshape(len(px), -1, 6)
    expected = np.stack([flat.mean(1), flat.std(1), np.median(flat, 1), flat.min(1),
                         flat.max(1)], -1)
    assert store.stats.dtype == np.float32 and store.stats.shape == (len(px), 6, 5)
    np.testing.assert_allclose(store.stats, expected, rtol=1e-6, atol=1e-5)
    site = store.norm("site")
    np.testing.assert_allclose(site[..., 0], expected[..., 0], rtol=1e-6)
    np.testing.assert_allclose(site[..., 1], np.maximum(expected[..., 1], 1.0), rtol=1e-6)
    none = store.norm("none")
    assert (none[..., 0] == 0).all() and (none[..., 1] == 255).all()


@pytest.mark.parametrize("mode,keys", [("plate", ["experiment", "plate"]),
                                       ("experiment", ["experiment"])])
def test_pooled_norms_equal_direct_pooling(store, mode, keys):
    px = store.pixels[:]
    norm = store.norm(mode)
    assert norm.shape == (len(px), 6, 2) and norm.dtype == np.float32
    groups = store.sites.groupby(keys)["row"]
    assert groups.ngroups > 1
    for _, rows in groups:
        rows = rows.to_numpy()
        allpx = px[rows].reshape(-1, 6).astype(np.float64)   # every pixel of the group
        want = np.stack([allpx.mean(0), np.maximum(allpx.std(0), 1.0)], -1)
        np.testing.assert_allclose(norm[rows], np.broadcast_to(want, norm[rows].shape),
                                   rtol=1e-5)
    # an experiment's norm differs between experiments (the batch effect is real)
    if mode == "experiment":
        assert len(np.unique(norm[:, 0, 0])) == store.sites["experiment"].nunique()


def test_dali_reads_every_sample(store):
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=32, num_threads=2, device_id=None)
    def pipe():
        return tuple(fn.readers.webdataset(
            paths=store.shard_paths(), index_paths=store.index_paths(),
            ext=["pixels", "row", "json"], dtypes=[types.UINT8, types.INT64, types.UINT8],
            missing_component_behavior="error", name="shards"))

    p = pipe()
    p.build()
    n = p.reader_meta("shards")["epoch_size"]
    assert n == len(store.sites)
    pixels = store.pixels[:]
    keys = []
    for _ in range(-(-n // 32)):
        px, row, meta = p.run()
        for i in range(len(px)):
            if len(keys) == n:   # the reader wraps around to fill the last batch
                break
            r = int(np.asarray(row[i])[0])
            m = json.loads(bytes(np.asarray(meta[i])))
            assert m["row"] == r
            assert np.asarray(px[i]).tobytes() == pixels[r].tobytes()
            keys.append(sample_key(m["id_code"], m["site"]))
    expected = [sample_key(r.id_code, r.site) for r in store.sites.itertuples()]
    assert sorted(keys) == sorted(expected) and len(set(keys)) == n


def test_webdataset_package_reads_every_sample(store):
    import webdataset as wds
    pixels = store.pixels[:]
    keys = []
    for s in wds.WebDataset(store.shard_paths(), shardshuffle=False, empty_check=False):
        r = int(np.frombuffer(s["row"], "<i8")[0])
        assert s["pixels"] == pixels[r].tobytes()
        assert json.loads(s["json"])["row"] == r
        keys.append(s["__key__"])
    expected = [sample_key(r.id_code, r.site) for r in store.sites.itertuples()]
    assert sorted(keys) == sorted(expected) and len(set(keys)) == len(expected)


def test_manifest(store, tiny_data):
    m = store.manifest
    assert (m["format"], m["format_version"], m["image_shape"]) == ("cellshard", 2, [64, 64, 6])
    assert m["source"]["layout"] == "kaggle"
    assert m["n_sites"] == len(store.sites) == sum(s["count"] for s in m["shards"])
    assert m["sites_table"]["sha256"] == sha256_file(os.path.join(store.root, "sites.csv"))
    assert m["source"]["files"]["train.csv"] == sha256_file(os.path.join(tiny_data, "train.csv"))
    for e, idx in zip(m["shards"], store.index_paths()):
        assert open(idx).readline().split() == ["v1.2", str(e["count"])]
    # synth writes pixel_stats.csv with 6 significant digits: the comparison says so
    check = m["pixel_stats_check"]
    assert check["compared"] == 6 * len(store.sites) and check["missing"] == 0
    assert 0 <= check["max_abs_diff"]["mean"] < 1e-3
    assert check["max_abs_diff"]["median"] == 0 and check["max_abs_diff"]["max"] == 0


def test_rerun_of_finished_store_does_nothing(tiny_store, tiny_data):
    before = {n: os.stat(os.path.join(tiny_store, "shards", n)).st_mtime_ns
              for n in os.listdir(os.path.join(tiny_store, "shards"))}
    t0 = time.time()
    out = pack(tiny_data, tiny_store, workers=2, shard_size_mb=_shard_mb(tiny_store), seed=0)
    assert out["sites_packed_now"] == 0 and time.time() - t0 < 5
    after = {n: os.stat(os.path.join(tiny_store, "shards", n)).st_mtime_ns
             for n in os.listdir(os.path.join(tiny_store, "shards"))}
    assert after == before


def test_kill_and_resume_gives_identical_store(tiny_data, tiny_store, tmp_path):
    out = str(tmp_path / "killed")
    # The hook SIGKILLs the whole process group (parent and workers, mid-write)
    # after 3 shards are final; a session of its own keeps pytest out of it.
    env = dict(os.environ, **{KILL_AFTER_ENV: "3"})
    proc = subprocess.run([sys.executable, "-m", "prep", "shards", "--data-dir", tiny_data,
                           "--out-dir", out, "--workers", "2", "--shard-size-mb",
                           str(_shard_mb(tiny_store))], cwd=REPO, env=env, start_new_session=True,
                          capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    shard_dir = os.path.join(out, "shards")
    # A shard is finished once its record exists (written after the tar's rename);
    # a tar renamed just before the kill but without its record is redone.
    final = {n: os.stat(os.path.join(shard_dir, n)).st_mtime_ns
             for n in os.listdir(shard_dir) if n.endswith(".tar")
             and os.path.isfile(os.path.join(out, ".prep", n[:-4] + ".json"))}
    n_total = len(open_store(tiny_store).shards())
    assert 3 <= len(final) < n_total

    summary = pack(tiny_data, out, workers=2, shard_size_mb=_shard_mb(tiny_store), seed=0)
    assert 0 < summary["sites_packed_now"] < summary["sites"]
    for n, mtime in final.items():   # finished shards were skipped, not rewritten
        assert os.stat(os.path.join(shard_dir, n)).st_mtime_ns == mtime
    assert not [n for n in os.listdir(shard_dir) if ".tmp-" in n]

    a, b = open_store(out), open_store(tiny_store)
    assert [(s["name"], s["sha256"]) for s in a.shards()] == \
           [(s["name"], s["sha256"]) for s in b.shards()]
    assert a.sites.equals(b.sites)
    np.testing.assert_array_equal(a.pixels[:], b.pixels[:])
    for name in ("stats", "norm_site", "norm_plate", "norm_experiment"):
        np.testing.assert_array_equal(a.group[name][:], b.group[name][:])
    leftovers = [os.path.join(d, n) for d, _, names in os.walk(out) for n in names
                 if ".tmp-" in n]
    assert not leftovers


def test_preview_is_rxrx_composite(tiny_store, store, tmp_path):
    r = store.sites.iloc[5]
    path = preview(tiny_store, r["id_code"], site=int(r["site"]), out=str(tmp_path / "p.png"))
    img = np.array(Image.open(path))
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    # rxrx1-utils' convert_tensor_to_rgb, written out as there
    t = store.pixels[5]
    rgb = {1: ([19, 0, 249], 51), 2: ([42, 255, 31], 107), 3: ([255, 0, 25], 64),
           4: ([45, 255, 252], 191), 5: ([250, 0, 253], 89), 6: ([254, 255, 40], 191)}
    chans = []
    for i, c in enumerate(CHANNELS):
        x = np.where((t[:, :, i] / 255) / (rgb[c][1] / 255) > 1, 1.0,
                     (t[:, :, i] / 255) / (rgb[c][1] / 255))
        chans.append(np.array(np.outer(x, rgb[c][0]).reshape(64, 64, 3), dtype=int))
    want = np.minimum(np.array(chans).sum(0), 255)
    np.testing.assert_array_equal(img, want)
    np.testing.assert_array_equal(composite(t), want)
    assert img.std() > 0
    with pytest.raises(StoreError, match="no site"):
        preview(tiny_store, "NOPE-01_1_B02", out=str(tmp_path / "q.png"))
