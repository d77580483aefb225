"""A damaged store is never trusted: open_store refuses it naming the missing thing,
verify lists it, preview never shows zeros for a lost chunk, and a re-run of
prep shards finds it (a tampered tar of equal size included) and repairs it."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from prep.pack import pack
from prep.verify import verify
from shards.manifest import sha256_file
from shards.store import StoreError, check_structure, open_store

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def copy(tiny_store, tmp_path):
    out = tmp_path / "store"
    shutil.copytree(tiny_store, out)
    return str(out)


def _manifest(out):
    return json.load(open(os.path.join(out, "manifest.json")))


def _repack(tiny_data, out):
    m = _manifest(out)
    return pack(tiny_data, out, workers=2, seed=0, shard_size_mb=m["prep"]["shard_size_mb"])


def _same_as(out, ref):
    a, b = open_store(out), open_store(ref)
    assert [(s["name"], s["sha256"]) for s in a.shards()] == \
           [(s["name"], s["sha256"]) for s in b.shards()]
    for s in a.shards():
        assert sha256_file(os.path.join(out, "shards", s["name"])) == s["sha256"]
    np.testing.assert_array_equal(a.pixels[:], b.pixels[:])
    for name in ("stats", "norm_site", "norm_plate", "norm_experiment"):
        np.testing.assert_array_equal(a.group[name][:], b.group[name][:])


def test_whole_store_has_no_structural_problem(tiny_store):
    assert check_structure(tiny_store, _manifest(tiny_store)) == []


def test_deleted_norm_array(copy, tiny_store, tiny_data):
    shutil.rmtree(os.path.join(copy, "store.zarr", "norm_experiment"))
    # training opens the store: it names the array, never a bare KeyError
    with pytest.raises(StoreError, match=r"norm_experiment: array norm_experiment missing.*"
                                         r"re-run `python -m prep shards"):
        open_store(copy)
    with pytest.raises(StoreError, match="array norm_experiment missing"):
        open_store(copy, check=False).norm("experiment")
    with pytest.raises(SystemExit, match="array norm_experiment missing"):
        verify(copy)
    out = _repack(tiny_data, copy)
    assert out["sites_packed_now"] == 0   # nothing but the arrays needed rewriting
    _same_as(copy, tiny_store)


def test_missing_pixels_chunk(copy, tiny_store, tiny_data, tmp_path):
    chunk = os.path.join(copy, "store.zarr", "pixels", "c.7.0.0.0")
    os.remove(chunk)
    with pytest.raises(StoreError, match=f"{chunk}: pixels chunk of row 7 missing"):
        open_store(copy)
    # zarr itself would hand back zeros for the lost chunk: the store's reader refuses
    store = open_store(copy, check=False)
    assert not store.pixels[7].any()
    with pytest.raises(StoreError, match="row 7 missing"):
        store.read_site(7)
    # verify without --full finds it (every chunk's presence is checked)
    with pytest.raises(SystemExit, match=f"{chunk}: pixels chunk of row 7"):
        verify(copy)
    # preview of that site: one line, exit 2, no image written
    r = store.sites.iloc[7]
    p = subprocess.run([sys.executable, "-m", "prep", "preview", copy, r["id_code"],
                        "--site", str(r["site"]), "--out", str(tmp_path / "p.png")],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "c.7.0.0.0" in p.stderr, p.stderr
    assert not (tmp_path / "p.png").exists()

    out = _repack(tiny_data, copy)
    assert 0 < out["sites_packed_now"] < out["sites"]   # only the shard holding row 7
    assert os.path.isfile(chunk)
    _same_as(copy, tiny_store)


def test_empty_pixels_chunk(copy):
    chunk = os.path.join(copy, "store.zarr", "pixels", "c.3.0.0.0")
    open(chunk, "wb").close()
    with pytest.raises(StoreError, match="row 3 missing or empty"):
        open_store(copy)


def test_tampered_tar_of_equal_size_is_repaired_by_rerun(copy, tiny_store, tiny_data):
    entry = _manifest(copy)["shards"][1]
    tar = os.path.join(copy, "shards", entry["name"])
    with open(tar, "r+b") as f:
        f.seek(3000)
        b = f.read(1)
        f.seek(3000)
        f.write(bytes([b[0] ^ 0xFF]))
    assert os.path.getsize(tar) == entry["bytes"]
    # open_store checks sizes only (hashing a full store costs minutes): documented
    open_store(copy)
    with pytest.raises(SystemExit, match=f"{tar}: sha256"):
        verify(copy)
    out = _repack(tiny_data, copy)
    assert out["sites_packed_now"] == entry["count"]   # that shard, and only it, repacked
    _same_as(copy, tiny_store)
    verify(copy)


@pytest.mark.parametrize("damage", ["truncate", "remove_tar", "remove_index", "remove_sites"])
def test_open_store_refuses_missing_or_resized_files(copy, damage):
    entry = _manifest(copy)["shards"][0]
    tar = os.path.join(copy, "shards", entry["name"])
    idx = os.path.join(copy, "shards", entry["index"])
    if damage == "truncate":
        with open(tar, "r+b") as f:
            f.truncate(entry["bytes"] - 512)
        what = f"{tar}: {entry['bytes'] - 512} bytes"
    elif damage == "remove_tar":
        os.remove(tar)
        what = f"{tar}: shard missing"
    elif damage == "remove_index":
        os.remove(idx)
        what = f"{idx}: shard index missing"
    else:
        os.remove(os.path.join(copy, "sites.csv"))
        what = "sites.csv: sites table missing"
    with pytest.raises(StoreError, match=f"{what}.*re-run `python -m prep shards"):
        open_store(copy)


def test_deleted_pixels_metadata_is_repaired(copy, tiny_store, tiny_data):
    os.remove(os.path.join(copy, "store.zarr", "pixels", "zarr.json"))
    with pytest.raises(StoreError, match="array pixels missing"):
        open_store(copy)
    _repack(tiny_data, copy)
    _same_as(copy, tiny_store)
