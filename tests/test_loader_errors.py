"""Bad input to `make_loader`: a clear error naming what is wrong, before any batch.

Every one is a BadInput (LoaderError, StoreError or MetadataError), so a CLI
prints it as one line and exits 2.
"""
import json
import os
import re
import shutil

import pandas as pd
import pytest

from common.errors import BadInput
from shards import LoaderError, LoaderSpec, StoreError, make_loader, open_store
from shards.metadata import MetadataError
from shards.selection import epoch_rows, well_sites


@pytest.fixture(scope="module")
def train_ids(tiny_store):
    sites = open_store(tiny_store).sites
    return list(sites[sites.split == "train"].id_code.unique()[:4])


def test_unknown_id_code(tiny_store, train_ids):
    sel = pd.DataFrame({"id_code": train_ids + ["HEPG2-99_1_B02"]})
    with pytest.raises(LoaderError, match=r"row 5: id_code 'HEPG2-99_1_B02' is not in the store"):
        make_loader(tiny_store, sel, LoaderSpec())


@pytest.mark.parametrize("channels,bad", [([1, 2, 7], "7"), ("[0,1]", "0"), ([2, 2], "repeats"),
                                          ([], "empty"), ("1,2,x", "not a list")])
def test_channel_out_of_range(channels, bad):
    with pytest.raises(LoaderError, match=rf"channels=.*{bad}"):
        LoaderSpec(channels=channels)


def test_empty_selection(tiny_store, tmp_path):
    with pytest.raises(LoaderError, match="empty"):
        make_loader(tiny_store, pd.DataFrame({"id_code": []}), LoaderSpec())
    csv = tmp_path / "header_only.csv"
    csv.write_text("id_code,sirna\n")
    with pytest.raises(LoaderError, match=f"{csv}: the selection is empty"):
        make_loader(tiny_store, str(csv), LoaderSpec())


def test_empty_selection_file_names_the_file(tiny_store, tmp_path):
    """Issue 11 #8: a 0-byte selection CSV said `No columns to parse from file`, no file named."""
    csv = tmp_path / "zero.csv"
    csv.write_text("")
    with pytest.raises(MetadataError, match=f"{csv}: file is empty"):
        make_loader(tiny_store, str(csv), LoaderSpec())


def test_non_integer_sirna_in_selection_csv_names_file_and_row(tiny_store, train_ids, tmp_path):
    """Issue 11 #8: sirna 'abc' in a selection CSV said `invalid literal for int()`."""
    csv = tmp_path / "sel.csv"
    pd.DataFrame({"id_code": train_ids, "sirna": ["1", "2", "abc", "4"]}).to_csv(csv, index=False)
    with pytest.raises(LoaderError, match=rf"{csv}, row 3: column 'sirna': label 'abc' of "
                                          rf"id_code '{train_ids[2]}' is not an integer"):
        make_loader(tiny_store, str(csv), LoaderSpec())


def test_blank_labels_in_csv_are_unlabelled(tiny_store, train_ids, tmp_path):
    csv = tmp_path / "sel.csv"
    csv.write_text("id_code,sirna\n" + "".join(f"{i},{v}\n" for i, v in
                                               zip(train_ids, ["3", "", " 5 ", "7.0"])))
    loader = make_loader(tiny_store, str(csv), LoaderSpec())
    assert loader.wells.label.tolist() == [3, -1, 5, 7]


@pytest.mark.parametrize("damage,problem", [
    # a store from before sites.csv had sirna_name, and one from the future
    ("version 1", "manifest.json: store format version 1, but this cellshard reads and writes "
                  "version 2; re-run prep"),
    ("version 99", "manifest.json: store format version 99, but this cellshard reads"),
    ("missing", "manifest.json: no manifest;"),
    ("sites", "sites.csv: sha256 differs from the manifest"),
])
def test_store_whose_manifest_fails(tiny_store, tmp_path, damage, problem):
    bad = tmp_path / "store"
    shutil.copytree(tiny_store, bad)
    if damage.startswith("version"):
        m = json.loads((bad / "manifest.json").read_text())
        m["format_version"] = int(damage.split()[1])
        (bad / "manifest.json").write_text(json.dumps(m))
    elif damage == "missing":
        os.remove(bad / "manifest.json")
    else:
        with open(bad / "sites.csv", "a") as f:
            f.write("\n")
    with pytest.raises(StoreError, match=re.escape(f"{bad}{os.sep}{problem}")):
        make_loader(str(bad), "train", LoaderSpec())


@pytest.mark.parametrize("kwargs,match", [
    (dict(norm="global"), "norm='global': choose one of site, plate, experiment, none"),
    (dict(sites="both"), "sites='both': choose one of random, two, one"),
    (dict(sites="one", site=3), "site=3"),
    (dict(backend="jax"), "backend='jax'"),
    (dict(rank=2, world_size=2), "rank=2"),
    (dict(batch_size=0), "batch_size=0"),
    (dict(batch_size=2.5), "batch_size=2.5"),
    (dict(image_size=-1), "image_size=-1"),
    (dict(channel_dropout=1.5), "channel_dropout=1.5"),
    (dict(shear_p=-0.1), "shear_p=-0.1"),
    (dict(shear_deg=float("nan")), "shear_deg=nan"),
    (dict(shuffle="yes"), "shuffle='yes'"),
    (dict(device="tpu"), "device='tpu'"),
    (dict(num_workers=-1), "num_workers=-1"),
])
def test_bad_spec_fields_are_named(kwargs, match):
    with pytest.raises(LoaderError, match=match) as e:
        LoaderSpec(**kwargs)
    assert isinstance(e.value, BadInput)


def test_spec_is_frozen_and_normalized():
    spec = LoaderSpec(channels="[1,2,3,5,6]", augment=True, image_size=64)
    assert spec.channels == (1, 2, 3, 5, 6) and spec.shuffle is True
    assert LoaderSpec(augment=True, shuffle=False).shuffle is False
    with pytest.raises(AttributeError):
        spec.batch_size = 8


def test_label_column_missing(tiny_store, train_ids):
    sel = pd.DataFrame({"id_code": train_ids, "sirna": [1, 2, 3, 4]})
    with pytest.raises(LoaderError, match="'label'"):
        make_loader(tiny_store, sel, LoaderSpec(label_column="label"))
    with pytest.raises(LoaderError, match="'sirna_id'"):
        make_loader(tiny_store, "train", LoaderSpec(label_column="sirna_id"))


def test_bad_selection_contents(tiny_store, train_ids, tmp_path):
    with pytest.raises(LoaderError, match=f"row 5: id_code '{train_ids[0]}'.*more than once"):
        make_loader(tiny_store, pd.DataFrame({"id_code": train_ids + train_ids[:1]}),
                    LoaderSpec())
    with pytest.raises(LoaderError, match=f"row 2: .*'x'.*{train_ids[1]}"):
        make_loader(tiny_store, pd.DataFrame({"id_code": train_ids, "sirna": [1, "x", 3, 4]}),
                    LoaderSpec())
    with pytest.raises(LoaderError, match="id_code column"):
        make_loader(tiny_store, pd.DataFrame({"well": ["B02"]}), LoaderSpec())
    with pytest.raises(MetadataError, match="missing column.*id_code"):
        csv = tmp_path / "no_id.csv"
        csv.write_text("well\nB02\n")
        make_loader(tiny_store, str(csv), LoaderSpec())
    with pytest.raises(LoaderError, match="neither a CSV"):
        make_loader(tiny_store, str(tmp_path / "nope.csv"), LoaderSpec())


def test_site_missing_for_mode_one():
    """A well with one site only (a site lost in prep): mode 'one' names the well,
    'random' always reads the site it has."""
    sites = pd.DataFrame({"row": [0, 1, 2], "id_code": ["A-01_1_B02", "A-01_1_B02", "A-01_1_B03"],
                          "site": [1, 2, 1]})
    wells = pd.DataFrame({"id_code": ["A-01_1_B02", "A-01_1_B03"], "label": [-1, -1]})
    table = well_sites(sites, wells)
    assert table.tolist() == [[0, 1], [2, -1]]
    with pytest.raises(LoaderError, match="'A-01_1_B03' has no site 2"):
        epoch_rows(table, wells, "one", 2, seed=0, epoch=0)
    for epoch in range(8):
        assert epoch_rows(table, wells, "random", 1, seed=0, epoch=epoch)[1] == 2
