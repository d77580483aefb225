"""The two layouts of one synthetic set (`prep synth --layout release`) pack into the same
store: byte-identical tars and indices, equal zarr arrays, the same sites table but for the
ThermoFisher names, the same folds; verify reads the release's images/."""
import filecmp
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import zarr

from prep.folds import write_folds
from prep.pack import pack
from prep.synth import synth
from prep.verify import verify
from shards.metadata import read_test_labels, source_test_ids
from shards.store import open_store

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTH = dict(preset="tiny", seed=3, experiments=3, image_size=32)
SHARD_MB = 0.1  # 32 px sites are ~7 KB: several shards per split


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    kaggle, release = str(root / "kaggle"), str(root / "release")
    synth(kaggle, workers=2, **SYNTH)
    # the release layout through the command line, as a user writes it
    p = subprocess.run([sys.executable, "-m", "prep", "synth", "--out-dir", release,
                        "--layout", "release", "--workers", "2",
                        *[f"--{k.replace('_', '-')}={v}" for k, v in SYNTH.items()]],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    stores = {}
    for name, data in (("kaggle", kaggle), ("release", release)):
        stores[name] = str(root / f"out_{name}")
        pack(data, stores[name], workers=2, shard_size_mb=SHARD_MB, seed=0)
    return dict(kaggle=kaggle, release=release, stores=stores, root=root)


def test_release_synth_is_the_release_layout(pair):
    release = pair["release"]
    assert sorted(os.listdir(release)) == ["images", "metadata.csv", "pixel_stats.csv",
                                           "relations.csv", "synth.json"]
    # the planted families are the same in both layouts (class ids, not layout names)
    assert filecmp.cmp(os.path.join(release, "relations.csv"),
                       os.path.join(pair["kaggle"], "relations.csv"), shallow=False)
    meta = pd.read_csv(os.path.join(release, "metadata.csv"))
    assert list(meta.columns) == ["site_id", "well_id", "cell_type", "dataset", "experiment",
                                  "plate", "well", "site", "well_type", "sirna", "sirna_id"]
    assert len(meta) == 2 * meta["well_id"].nunique()
    first = meta.iloc[0]
    assert os.path.isfile(os.path.join(release, "images", first["experiment"],
                                       f"Plate{first['plate']}",
                                       f"{first['well']}_s{first['site']}_w6.png"))
    # same PNG bytes as the Kaggle layout's
    kaggle_png = os.path.join(pair["kaggle"], first["dataset"], first["experiment"],
                              f"Plate{first['plate']}", f"{first['well']}_s{first['site']}_w6.png")
    release_png = os.path.join(release, "images", first["experiment"], f"Plate{first['plate']}",
                               f"{first['well']}_s{first['site']}_w6.png")
    assert filecmp.cmp(kaggle_png, release_png, shallow=False)


def test_public_test_labels_are_the_kaggle_truth(pair):
    labels = read_test_labels(pair["release"])
    truth = pd.read_csv(os.path.join(pair["kaggle"], "test_truth.csv"))
    assert labels["id_code"].tolist() == truth["id_code"].tolist()
    assert labels["sirna"].tolist() == truth["sirna"].tolist()
    assert source_test_ids(pair["release"]) == source_test_ids(pair["kaggle"]) == \
        truth["id_code"].tolist()


def test_both_layouts_give_byte_identical_shards(pair):
    k, r = (pair["stores"][n] for n in ("kaggle", "release"))
    mk, mr = (json.load(open(os.path.join(d, "manifest.json"))) for d in (k, r))
    assert mk["shards"] == mr["shards"] and len(mk["shards"]) >= 4
    for s in mk["shards"]:
        for name in (s["name"], s["index"]):
            assert filecmp.cmp(os.path.join(k, "shards", name), os.path.join(r, "shards", name),
                               shallow=False), name


def test_both_layouts_give_equal_zarr_arrays(pair):
    k, r = (zarr.open_group(os.path.join(pair["stores"][n], "store.zarr"), mode="r")
            for n in ("kaggle", "release"))
    assert sorted(k.array_keys()) == sorted(r.array_keys()) == \
        ["norm_experiment", "norm_plate", "norm_site", "pixels", "stats"]
    for name in k.array_keys():
        np.testing.assert_array_equal(k[name][:], r[name][:], err_msg=name)
    assert dict(k.attrs) == dict(r.attrs)


def test_sites_table_and_manifest_differ_only_in_names_and_source(pair):
    k, r = (open_store(pair["stores"][n]) for n in ("kaggle", "release"))
    pd.testing.assert_frame_equal(k.sites.drop(columns="sirna_name"),
                                  r.sites.drop(columns="sirna_name"))
    assert (k.sites["sirna_name"] == "").all()
    known = r.sites["sirna"] >= 0
    assert (r.sites.loc[known, "sirna_name"] == "s" + (20000 + r.sites.loc[known, "sirna"])
            .astype(str)).all()
    assert (r.sites.loc[~known, "sirna_name"] == "").all() and (~known).any()

    mk, mr = dict(k.manifest), dict(r.manifest)
    assert (mk["source"]["layout"], mr["source"]["layout"]) == ("kaggle", "release")
    assert sorted(mr["source"]["files"]) == ["metadata.csv", "pixel_stats.csv"]
    assert mk.pop("source") != mr.pop("source")
    assert mk.pop("sites_table")["sha256"] != mr.pop("sites_table")["sha256"]
    assert mk == mr


def test_both_layouts_give_the_same_folds(pair):
    out = {n: str(pair["root"] / f"csv_{n}") for n in ("kaggle", "release")}
    paths = {n: write_folds(pair[n], n_folds=2, out_dir=out[n]) for n in out}
    assert [os.path.basename(p) for p in paths["kaggle"]] == \
        [os.path.basename(p) for p in paths["release"]]
    for a, b in zip(paths["kaggle"], paths["release"]):
        assert filecmp.cmp(a, b, shallow=False), a


def test_verify_reads_the_release_images(pair, capsys):
    result = verify(pair["stores"]["release"], full=True)
    assert result["ok"] and result["sites_compared_to_png"] == len(
        open_store(pair["stores"]["release"]).sites)
    # the Kaggle store against the release data: same pixels, other source files
    with pytest.raises(SystemExit) as e:
        verify(pair["stores"]["kaggle"], data_dir=pair["release"])
    msg = str(e.value)
    assert "1 problem(s)" in msg and "source CSVs (release layout) differ" in msg, msg


def test_synth_refuses_a_bad_layout_and_the_other_layouts_directory(pair, tmp_path):
    p = subprocess.run([sys.executable, "-m", "prep", "synth", "--out-dir", str(tmp_path / "x"),
                        "--layout", "zip"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and lines == ["error: --layout 'zip': choose one of kaggle, release"]
    assert not (tmp_path / "x").exists()
    # a Kaggle synth is not overwritten by a release synth of otherwise the same parameters
    with pytest.raises(ValueError, match="holds a synth of other parameters"):
        synth(pair["kaggle"], workers=2, layout_name="release", **SYNTH)
    assert not os.path.exists(os.path.join(pair["kaggle"], "metadata.csv"))
