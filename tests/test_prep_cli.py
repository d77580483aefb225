"""`python -m prep`: every bad input is one line on stderr naming the file, row or key, exit 2;
every command answers --help; two runs on one OUT_DIR are refused, not interleaved."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from prep.lock import LockedError, out_dir_lock
from prep.site_stats import compare_reference
from shards.metadata import MetadataError, load_sites

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def prep(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "prep", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def bad_input(*args, names=()):
    """Run prep expecting exit 2 and one `error:` line on stderr that holds every name."""
    p = prep(*args)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    # progress bars (tqdm) may precede the error on stderr; the error is the last line
    errors = [line for line in lines if line.startswith("error: ")]
    assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
    assert len(errors) == 1 and lines[-1] == errors[0], p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    for name in names:
        assert str(name) in errors[0], (name, errors[0])
    return errors[0]


@pytest.fixture
def data(tiny_data, tmp_path):
    """A private copy of the tiny dataset: CSVs copied, PNGs symlinked (replace, don't edit)."""
    out = tmp_path / "data"
    shutil.copytree(tiny_data, out, copy_function=os.symlink)
    for name in os.listdir(out):
        if name.endswith(".csv"):
            os.remove(out / name)
            shutil.copy(os.path.join(tiny_data, name), out / name)
    return out


@pytest.mark.parametrize("command", ["", "synth", "folds", "shards", "verify", "preview"])
def test_every_command_answers_help(command):
    p = prep(*([command] if command else []), "--help")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "Traceback" not in p.stdout + p.stderr
    assert (command or "synth") in (p.stdout + p.stderr)


def test_shards_missing_data_dir(tmp_path):
    bad_input("shards", tmp_path / "nope", tmp_path / "out", names=[tmp_path / "nope"])
    assert not (tmp_path / "out").exists()


def test_shards_out_dir_is_a_file(tiny_data, tmp_path):
    out = tmp_path / "out"
    out.write_text("a file")
    bad_input("shards", tiny_data, out, names=[out, "is a file"])


@pytest.mark.parametrize("value", ["0", "-1", "abc"])
def test_shards_bad_shard_size(tiny_data, tmp_path, value):
    bad_input("shards", tiny_data, tmp_path / "out", "--shard-size-mb", value,
              names=["--shard-size-mb"])
    assert not (tmp_path / "out").exists()


def test_shards_bad_csv_names_file_and_row(data, tmp_path):
    path = data / "train.csv"
    lines = path.read_text().splitlines()
    cells = lines[3].split(",")
    cells[-1] = "5000"   # row 3 of the data: a siRNA that does not exist
    lines[3] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")
    bad_input("shards", data, tmp_path / "out", names=[path, "row 3", "5000"])


def test_shards_bad_png_names_file(data, tmp_path):
    r = load_sites(str(data)).iloc[40]
    png = data / r["split"] / r["experiment"] / f"Plate{r['plate']}" / f"{r['well']}_s{r['site']}_w2.png"
    os.remove(png)
    png.write_bytes(b"not a png")
    bad_input("shards", data, tmp_path / "out", "--workers", 2, "--shard-size-mb", 0.5,
              names=[png])


def test_shards_garbage_manifest(tiny_data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("{ not json")
    bad_input("shards", tiny_data, out, names=[out / "manifest.json", "unreadable manifest"])


def test_folds_zero(tiny_data, tmp_path):
    bad_input("folds", tiny_data, "--n-folds", 0, "--out-dir", tmp_path / "csv",
              names=["n_folds=0"])
    assert not (tmp_path / "csv").exists()


def test_folds_missing_data_dir(tmp_path):
    bad_input("folds", tmp_path / "nope", "--out-dir", tmp_path / "csv",
              names=[tmp_path / "nope"])


def test_verify_not_a_store(tmp_path):
    bad_input("verify", tmp_path, names=[tmp_path / "manifest.json", "no manifest"])


def test_preview_unknown_id(tiny_store, tmp_path):
    bad_input("preview", tiny_store, "NOPE-01_1_B02", "--out", tmp_path / "p.png",
              names=["NOPE-01_1_B02"])
    assert not (tmp_path / "p.png").exists()


def test_preview_bad_out_name(tiny_store, tmp_path):
    bad_input("preview", tiny_store, "HEPG2-01_1_B02", "--out", tmp_path / "p.nope",
              names=["--out", "p.nope"])


def test_synth_image_size_zero(tmp_path):
    bad_input("synth", tmp_path / "s", "--image-size", 0, names=["--image-size 0"])
    assert not (tmp_path / "s").exists()


def test_synth_refuses_kaggle_data_dir(data):
    os.remove(data / "synth.json")   # now a user's Kaggle data: CSVs and PNGs
    before = (data / "train.csv").read_bytes()
    bad_input("synth", data, names=[data, "synth.json"])
    assert (data / "train.csv").read_bytes() == before


def test_malformed_pixel_stats_names_file_and_row(data):
    path = data / "pixel_stats.csv"
    lines = path.read_text().splitlines()
    cells = lines[5].split(",")
    cells[-1] = "lots"   # the max of row 5
    lines[5] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")
    sites = load_sites(str(data))
    import numpy as np
    with pytest.raises(MetadataError, match=r"pixel_stats.csv, row 5 .*max 'lots' is not a number"):
        compare_reference(np.zeros((len(sites), 6, 5)), sites, str(path))


# ---------------------------------------------------------------- one run per OUT_DIR

def test_second_run_on_one_out_dir_is_refused_naming_the_first(tiny_data, tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".prep").mkdir(parents=True)
        (out / ".prep" / "lock").write_text(f"{holder.pid}\n")   # a live run's lock
        bad_input("shards", tiny_data, out, names=[f"pid {holder.pid}", out])
        assert sorted(os.listdir(out / ".prep")) == ["lock"]   # nothing written
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_of_a_dead_run_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    work = tmp_path / ".prep"
    work.mkdir()
    (work / "lock").write_text(f"{dead.pid}\n")
    with out_dir_lock(str(work)) as path:
        assert open(path).read().strip() == str(os.getpid())
        with pytest.raises(LockedError, match=f"pid {os.getpid()}"):
            with out_dir_lock(str(work)):
                pass
    assert not (work / "lock").exists()
    assert os.listdir(work) == []   # the lock's temporary is gone too


class _Killed(BaseException):
    """Stands for the process being killed: not an Exception, so no handler swallows it."""


@pytest.mark.parametrize("when", ["midway through the bytes", "at the rename"])
def test_a_manifest_write_killed_midway_leaves_the_old_one_whole(tiny_store, tmp_path,
                                                                  monkeypatch, when):
    import builtins

    from shards.manifest import read_manifest, write_manifest

    out = tmp_path / "store"
    out.mkdir()
    shutil.copy(os.path.join(tiny_store, "manifest.json"), out / "manifest.json")
    old = (out / "manifest.json").read_bytes()
    new = dict(read_manifest(str(out)), note="x" * 20000)
    real_open = builtins.open

    class HalfFile:
        """A file under `out` whose write stops after half its bytes, as a kill would."""

        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[:len(data) // 2])
            self.f.flush()
            raise _Killed

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def __getattr__(self, name):
            return getattr(self.f, name)

    def half_open(file, mode="r", *args, **kw):
        f = real_open(file, mode, *args, **kw)
        inside = os.path.abspath(str(file)).startswith(str(out))
        return HalfFile(f) if inside and any(c in mode for c in "wax+") else f

    def no_rename(src, dst):
        raise _Killed

    if when == "at the rename":
        monkeypatch.setattr(os, "replace", no_rename)
        monkeypatch.setattr(os, "rename", no_rename)
    else:
        monkeypatch.setattr(builtins, "open", half_open)
    with pytest.raises(_Killed):
        write_manifest(str(out), new)
    monkeypatch.undo()
    assert os.listdir(out) == ["manifest.json"]   # no temporary left behind
    assert (out / "manifest.json").read_bytes() == old
    write_manifest(str(out), new)   # and the next write goes through
    assert read_manifest(str(out)) == new
