"""Bad input to `make_loader`: a clear error naming what is wrong, before any batch."""
import json
import os
import shutil

import pandas as pd
import pytest

from shards import make_loader, open_store
from shards.selection import epoch_rows, well_sites


@pytest.fixture(scope="module")
def train_ids(tiny_store):
    sites = open_store(tiny_store).sites
    return list(sites[sites.split == "train"].id_code.unique()[:4])


def test_unknown_id_code(tiny_store, train_ids):
    sel = pd.DataFrame({"id_code": train_ids + ["HEPG2-99_1_B02"]})
    with pytest.raises(LookupError, match=r"HEPG2-99_1_B02.*not in the store"):
        make_loader(tiny_store, sel)


@pytest.mark.parametrize("channels,bad", [([1, 2, 7], "7"), ("[0,1]", "0"), ([2, 2], "repeats")])
def test_channel_out_of_range(tiny_store, channels, bad):
    with pytest.raises(ValueError, match=bad):
        make_loader(tiny_store, "train", channels=channels)


def test_empty_selection(tiny_store, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        make_loader(tiny_store, pd.DataFrame({"id_code": []}))
    csv = tmp_path / "empty.csv"
    csv.write_text("id_code,sirna\n")
    with pytest.raises(ValueError, match="empty"):
        make_loader(tiny_store, str(csv))


@pytest.mark.parametrize("damage", ["version", "missing", "sites"])
def test_store_whose_manifest_fails(tiny_store, tmp_path, damage):
    bad = tmp_path / "store"
    shutil.copytree(tiny_store, bad)
    if damage == "version":
        m = json.loads((bad / "manifest.json").read_text())
        m["format_version"] = 99
        (bad / "manifest.json").write_text(json.dumps(m))
    elif damage == "missing":
        os.remove(bad / "manifest.json")
    else:
        with open(bad / "sites.csv", "a") as f:
            f.write("\n")
    with pytest.raises(ValueError, match="manifest|sha256"):
        make_loader(str(bad), "train")


@pytest.mark.parametrize("kwargs,match", [
    (dict(norm="global"), "norm='global'"),
    (dict(sites="both"), "sites='both'"),
    (dict(sites="one", site=3), "site=3"),
    (dict(backend="jax"), "backend='jax'"),
    (dict(rank=2, world_size=2), "rank=2"),
    (dict(batch_size=0), "batch_size=0"),
    (dict(image_size=-1), "image_size=-1"),
])
def test_unknown_modes_and_bad_arguments(tiny_store, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_loader(tiny_store, "train", **kwargs)


def test_label_column_missing(tiny_store, train_ids):
    sel = pd.DataFrame({"id_code": train_ids, "sirna": [1, 2, 3, 4]})
    with pytest.raises(LookupError, match="'label'"):
        make_loader(tiny_store, sel, label_column="label")
    with pytest.raises(LookupError, match="'sirna_id'"):
        make_loader(tiny_store, "train", label_column="sirna_id")


def test_bad_selection_contents(tiny_store, train_ids, tmp_path):
    with pytest.raises(ValueError, match=f"{train_ids[0]}.*more than once"):
        make_loader(tiny_store, pd.DataFrame({"id_code": train_ids + train_ids[:1]}))
    with pytest.raises(ValueError, match=f"'x'.*{train_ids[1]}"):
        make_loader(tiny_store, pd.DataFrame({"id_code": train_ids, "sirna": [1, "x", 3, 4]}))
    with pytest.raises(LookupError, match="id_code column"):
        make_loader(tiny_store, pd.DataFrame({"well": ["B02"]}))
    with pytest.raises(ValueError, match="neither a CSV"):
        make_loader(tiny_store, str(tmp_path / "nope.csv"))


def test_site_missing_for_mode_one():
    """A well with one site only (a site lost in prep): mode 'one' names the well,
    'random' always reads the site it has."""
    sites = pd.DataFrame({"row": [0, 1, 2], "id_code": ["A-01_1_B02", "A-01_1_B02", "A-01_1_B03"],
                          "site": [1, 2, 1]})
    wells = pd.DataFrame({"id_code": ["A-01_1_B02", "A-01_1_B03"], "label": [-1, -1]})
    table = well_sites(sites, wells)
    assert table.tolist() == [[0, 1], [2, -1]]
    with pytest.raises(LookupError, match="'A-01_1_B03' has no site 2"):
        epoch_rows(table, wells, "one", 2, seed=0, epoch=0)
    for epoch in range(8):
        assert epoch_rows(table, wells, "random", 1, seed=0, epoch=epoch)[1] == 2
