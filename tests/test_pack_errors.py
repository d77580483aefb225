"""Bad input to prep shards: a clear error naming the file, and nothing half-written left behind."""
import json
import os
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

from prep.pack import pack
from prep.png_io import PngError
from shards.atomic import temp_owner
from shards.layout import png_path
from shards.manifest import ManifestError
from shards.metadata import load_sites

SHARD_MB = 0.5  # small shards, so that an error strikes while other shards finish


@pytest.fixture
def data(tiny_data, tmp_path):
    """A private copy of the tiny dataset: CSVs copied, PNGs symlinked (replace, don't edit)."""
    out = tmp_path / "data"
    shutil.copytree(tiny_data, out, copy_function=os.symlink)
    for name in os.listdir(out):
        if name.endswith(".csv"):
            os.remove(out / name)
            shutil.copy(os.path.join(tiny_data, name), out / name)
    return str(out)


def _site(data_dir, row):
    return load_sites(data_dir).iloc[row]


def _path(data_dir, r, channel):
    return png_path(data_dir, r["split"], r["experiment"], r["plate"], r["well"], r["site"],
                    channel)


def _replace(path, data: bytes):
    os.remove(path)  # a symlink into the shared dataset: never write through it
    with open(path, "wb") as f:
        f.write(data)


def _save(path, array, **kw):
    os.remove(path)
    Image.fromarray(array, **kw).save(path)


def _assert_nothing_final(out, bad_key=None):
    """No manifest, no temporary file, and every tar under a final name is complete
    (it has its record) and does not hold the bad site."""
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    for d, _, names in os.walk(out):   # the one temporary scheme, shards.atomic's
        assert not [n for n in names if temp_owner(n) is not None], d
    shards = os.path.join(out, "shards")
    for name in os.listdir(shards) if os.path.isdir(shards) else []:
        if name.endswith(".tar"):
            assert os.path.isfile(os.path.join(out, ".prep", name[:-4] + ".json"))
            with tarfile.open(os.path.join(shards, name)) as tf:
                keys = {m.name.split(".")[0] for m in tf}
            assert bad_key not in keys


def _pack_fails(data, out, exc, *patterns):
    with pytest.raises(exc) as e:
        pack(data, out, workers=2, shard_size_mb=SHARD_MB)
    for p in patterns:
        assert p in str(e.value), str(e.value)
    return str(e.value)


ROW = 101  # a train site in the middle of the table, not the first


def test_truncated_png(data, tmp_path):
    r = _site(data, ROW)
    path = _path(data, r, 3)
    raw = open(path, "rb").read()
    _replace(path, raw[: len(raw) // 2])
    _pack_fails(data, str(tmp_path / "out"), PngError, path, "truncated")
    _assert_nothing_final(str(tmp_path / "out"), f"{r['id_code']}_s{r['site']}")


def test_corrupt_png(data, tmp_path):
    r = _site(data, ROW)
    path = _path(data, r, 5)
    raw = bytearray(open(path, "rb").read())
    raw[100:140] = bytes(b ^ 0xFF for b in raw[100:140])   # inside the compressed data
    _replace(path, bytes(raw))
    _pack_fails(data, str(tmp_path / "out"), PngError, path, "corrupt")
    _assert_nothing_final(str(tmp_path / "out"), f"{r['id_code']}_s{r['site']}")


def test_not_a_png(data, tmp_path):
    path = _path(data, _site(data, ROW), 1)
    _replace(path, b"this is not an image")
    _pack_fails(data, str(tmp_path / "out"), PngError, path, "not a readable PNG")


def test_missing_channel_file_is_found_before_writing(data, tmp_path):
    path = _path(data, _site(data, ROW), 4)
    os.remove(path)
    out = str(tmp_path / "out")
    _pack_fails(data, out, PngError, path, "missing")
    assert not os.path.exists(out)   # checked before anything was created


def test_wrong_size(data, tmp_path):
    r = _site(data, ROW)
    path = _path(data, r, 2)
    _save(path, np.zeros((32, 48), np.uint8))
    msg = _pack_fails(data, str(tmp_path / "out"), PngError, path, "48x32", "64x64")
    assert "image size" in msg
    _assert_nothing_final(str(tmp_path / "out"), f"{r['id_code']}_s{r['site']}")


def test_channels_of_first_site_disagree(data, tmp_path):
    # The store's shape comes from the first site, so its channels are compared with channel 1.
    r = _site(data, 0)
    path = _path(data, r, 6)
    _save(path, np.zeros((64, 60), np.uint8))
    out = str(tmp_path / "out")
    _pack_fails(data, out, PngError, path, "channel 1", "60x64")
    assert not os.path.exists(out)


def test_sixteen_bit(data, tmp_path):
    path = _path(data, _site(data, ROW), 1)
    _save(path, np.full((64, 64), 1000, np.uint16))
    _pack_fails(data, str(tmp_path / "out"), PngError, path, "16-bit")


def test_not_grayscale(data, tmp_path):
    path = _path(data, _site(data, ROW), 1)
    _save(path, np.zeros((64, 64, 3), np.uint8))
    _pack_fails(data, str(tmp_path / "out"), PngError, path, "RGB", "grayscale")


def test_refuses_store_of_other_format_version(tiny_data, tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    manifest = {"format": "cellshard", "format_version": 3, "shards": []}
    (out / "manifest.json").write_text(json.dumps(manifest))
    msg = _pack_fails(tiny_data, str(out), ManifestError, "version 3", "delete")
    assert "new output directory" in msg
    assert json.loads((out / "manifest.json").read_text()) == manifest   # left alone
    assert sorted(os.listdir(out)) == ["manifest.json"]


def test_refuses_unfinished_store_of_other_format_version(tiny_data, tmp_path):
    out = tmp_path / "old"
    (out / "store.zarr").mkdir(parents=True)
    (out / "store.zarr" / "zarr.json").write_text(json.dumps(
        {"zarr_format": 3, "node_type": "group",
         "attributes": {"format": "cellshard", "format_version": 0}}))
    _pack_fails(tiny_data, str(out), ManifestError, "version 0", "delete")
    assert sorted(os.listdir(out)) == ["store.zarr"]


def test_refuses_store_of_other_source(tiny_data, tiny_store, data, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(tiny_store, out)
    with open(os.path.join(data, "train.csv"), "a") as f:
        f.write("\n")   # same wells, other bytes: another source
    _pack_fails(data, str(out), ManifestError, "other source")
