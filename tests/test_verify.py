"""prep verify: passes on a good store, names the file on each kind of damage."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from prep.verify import verify
from shards.store import StoreError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def store_copy(tiny_store, tmp_path):
    out = tmp_path / "store"
    shutil.copytree(tiny_store, out)
    return str(out)


def _manifest(out):
    return json.load(open(os.path.join(out, "manifest.json")))


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def test_verify_passes_on_good_store(tiny_store, tiny_data):
    out = verify(tiny_store, full=True, data_dir=tiny_data)
    assert out["ok"] and out["sites_compared_to_png"] == out["sites"] > 500
    assert verify(tiny_store)["sites_compared_to_png"] == 64  # data dir from the manifest


def _verify_cli(*args):
    return subprocess.run([sys.executable, "-m", "prep", "verify", *args], cwd=REPO,
                          capture_output=True, text=True)


def test_verify_cli_exit_codes(tiny_store, store_copy, tmp_path):
    ok = _verify_cli(tiny_store)
    assert ok.returncode == 0, ok.stderr
    # a damaged store: the verdict, exit 1, listing what differs (several lines by design)
    shard = os.path.join(store_copy, "shards", _manifest(store_copy)["shards"][0]["name"])
    _flip(shard, 5000)
    bad = _verify_cli(store_copy)
    assert bad.returncode == 1, bad.stderr
    assert "Traceback" not in bad.stderr
    lines = bad.stderr.strip().splitlines()
    assert lines[0] == f"verify {store_copy}: {len(lines) - 1} problem(s)", lines
    assert lines[1].startswith(f"{shard}: sha256"), lines
    assert all(line.startswith(f"{shard}: ") for line in lines[1:]), lines
    # not a store at all: bad input, one line and exit 2
    (tmp_path / "empty").mkdir()
    none = _verify_cli(str(tmp_path / "empty"))
    assert none.returncode == 2, none.stderr
    lines = none.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "manifest.json" in lines[0], lines


def test_flipped_byte_in_shard_pixels(store_copy):
    entry = _manifest(store_copy)["shards"][2]
    shard = os.path.join(store_copy, "shards", entry["name"])
    idx = open(os.path.join(store_copy, "shards", entry["index"])).read().splitlines()
    # first sample: "pixels <offset> <size> <name> row ..."; flip a byte inside its pixels
    _, offset, _, name = idx[1].split()[:4]
    _flip(shard, int(offset) + 100)
    with pytest.raises(SystemExit) as e:
        verify(store_copy, full=True)
    msg = str(e.value)
    assert f"{shard}: sha256" in msg
    assert f"sample {name.split('.')[0]} pixels differ" in msg


def test_flipped_byte_in_tar_header(store_copy):
    entry = _manifest(store_copy)["shards"][0]
    shard = os.path.join(store_copy, "shards", entry["name"])
    _flip(shard, 10)   # inside the first member's name
    with pytest.raises(SystemExit, match=f"{shard}: sha256"):
        verify(store_copy)


def test_truncated_shard(store_copy):
    entry = _manifest(store_copy)["shards"][-1]
    shard = os.path.join(store_copy, "shards", entry["name"])
    with open(shard, "r+b") as f:
        f.truncate(entry["bytes"] // 2)
    with pytest.raises(SystemExit, match="truncated or replaced"):
        verify(store_copy)


def test_missing_shard(store_copy):
    entry = _manifest(store_copy)["shards"][1]
    os.remove(os.path.join(store_copy, "shards", entry["name"]))
    with pytest.raises(SystemExit, match=f"{entry['name']}: shard missing"):
        verify(store_copy)


def test_damaged_zarr_chunk(store_copy):
    chunk = os.path.join(store_copy, "store.zarr", "pixels", "c.7.0.0.0")
    _flip(chunk, os.path.getsize(chunk) // 2)
    with pytest.raises(SystemExit, match="row 7 "):
        verify(store_copy, full=True)


def test_tampered_sites_table(store_copy):
    path = os.path.join(store_copy, "sites.csv")
    text = open(path).read()
    open(path, "w").write(text.replace("positive_control", "negative_control", 1))
    with pytest.raises(StoreError, match="sites.csv: sha256"):
        verify(store_copy)
