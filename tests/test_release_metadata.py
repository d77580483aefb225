"""The release layout's metadata.csv: layout detection, the same tables as the Kaggle files,
the public test labels, and a one-line error naming file and row for every malformed case."""
import os
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from shards.layout import GROUP_SIZE, RELEASE_COLUMNS, png_path
from shards.metadata import (MetadataError, load_sites, load_wells, read_test_labels,
                             source_test_ids)
from shards.source_layout import detect_layout
from test_metadata import make_layout, write_layout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def name_of(sirna_id):
    return f"s{20000 + int(sirna_id)}"


def release_frame(frames):
    """metadata.csv (strings, one row per site) holding the wells of Kaggle `frames`
    (make_layout), test treatment wells labelled as the train ones are."""
    parts = []
    for name, df in frames.items():
        df = df.copy()
        split = "test" if name.startswith("test") else "train"
        if "well_type" not in df:
            df["well_type"] = "treatment"
        if "sirna" not in df:  # test.csv: the labels the release makes public, as in train
            w = df["well"].map({w: i for i, w in enumerate(sorted(set(df["well"])))})
            df["sirna"] = ((df["plate"].astype(int) - 1) * GROUP_SIZE + w).astype(str)
        df["dataset"] = split
        parts.append(df)
    wells = pd.concat(parts, ignore_index=True)
    rows = wells.loc[wells.index.repeat(2)].reset_index(drop=True)
    rows["site"] = np.tile(["1", "2"], len(wells))
    out = pd.DataFrame({
        "site_id": rows["id_code"] + "_" + rows["site"], "well_id": rows["id_code"],
        "cell_type": rows["experiment"].str.split("-").str[0], "dataset": rows["dataset"],
        "experiment": rows["experiment"], "plate": rows["plate"], "well": rows["well"],
        "site": rows["site"], "well_type": rows["well_type"],
        "sirna": rows["sirna"].map(name_of), "sirna_id": rows["sirna"],
    })
    assert tuple(out.columns) == RELEASE_COLUMNS
    return out.astype(str)


def write_release(data_dir, meta):
    os.makedirs(data_dir, exist_ok=True)
    meta.to_csv(os.path.join(data_dir, "metadata.csv"), index=False)
    return str(data_dir)


@pytest.fixture
def meta():
    return release_frame(make_layout())


# --- the same tables from either layout ---------------------------------------

def test_release_gives_the_kaggle_tables_with_names(tmp_path, meta):
    kaggle = load_sites(write_layout(tmp_path / "k", make_layout()))
    release = load_sites(write_release(tmp_path / "r", meta))
    assert detect_layout(tmp_path / "k") == "kaggle" and detect_layout(tmp_path / "r") == "release"
    pd.testing.assert_frame_equal(release.drop(columns="sirna_name"),
                                  kaggle.drop(columns="sirna_name"))
    hidden = (release["split"] == "test") & (release["well_type"] == "treatment")
    # the public test labels stay out of the tables (and so out of the store)
    assert (release.loc[hidden, "sirna"] == -1).all()
    assert (release.loc[hidden, "sirna_name"] == "").all()
    assert (release.loc[~hidden, "sirna_name"] == release.loc[~hidden, "sirna"].map(name_of)).all()
    assert (kaggle["sirna_name"] == "").all()


def test_test_well_ids_follow_the_source_order(tmp_path, meta):
    frames = make_layout()
    assert source_test_ids(write_layout(tmp_path / "k", frames)) == frames["test.csv"]["id_code"].tolist()
    expected = meta.loc[(meta["dataset"] == "test") & (meta["well_type"] == "treatment")
                        & (meta["site"] == "1"), "well_id"].tolist()
    assert source_test_ids(write_release(tmp_path / "r", meta)) == expected == \
        frames["test.csv"]["id_code"].tolist()


def test_read_test_labels_one_label_per_well(tmp_path, meta):
    data = write_release(tmp_path, meta)
    labels = read_test_labels(data)  # a data directory, or the file itself
    pd.testing.assert_frame_equal(labels, read_test_labels(os.path.join(data, "metadata.csv")))
    assert list(labels.columns) == ["id_code", "experiment", "cell_type", "plate", "well",
                                    "well_type", "sirna", "sirna_name"]
    test = meta[(meta["dataset"] == "test") & (meta["well_type"] == "treatment")]
    assert labels["id_code"].tolist() == test["well_id"].iloc[::2].tolist()
    assert labels["sirna"].tolist() == test["sirna_id"].iloc[::2].astype(int).tolist()
    assert labels["sirna_name"].tolist() == test["sirna"].iloc[::2].tolist()
    assert set(labels["cell_type"]) == {"HEPG2", "U2OS"} and labels["plate"].dtype == np.int64
    controls = read_test_labels(data, well_types=("positive_control", "negative_control"))
    assert set(controls["sirna"]) == {1111, 1138}
    no_test = meta[meta["dataset"] == "train"]
    with pytest.raises(MetadataError, match="no test wells"):
        read_test_labels(write_release(tmp_path / "train_only", no_test))


def test_release_png_path():
    assert png_path("D", "test", "HEPG2-02", 3, "B02", 2, 5, "release") == \
        os.path.join("D", "images", "HEPG2-02", "Plate3", "B02_s2_w5.png")
    assert png_path("D", "test", "HEPG2-02", 3, "B02", 2, 5) == \
        os.path.join("D", "test", "HEPG2-02", "Plate3", "B02_s2_w5.png")


# --- layout detection ----------------------------------------------------------

def test_neither_layout_names_what_was_looked_for(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(MetadataError) as e:
        load_wells(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path) in msg
    for name in ("train.csv", "test.csv", "train_controls.csv", "test_controls.csv",
                 "metadata.csv", "images/"):
        assert name in msg, msg


def test_both_layouts_are_refused(tmp_path, meta):
    write_layout(tmp_path, make_layout())
    write_release(tmp_path, meta)
    with pytest.raises(MetadataError, match="holds both RxRx1 layouts"):
        load_wells(tmp_path)


def test_missing_data_dir(tmp_path):
    with pytest.raises(MetadataError, match="data directory not found"):
        load_wells(tmp_path / "nope")


# --- every malformed metadata.csv: one line naming file and row ------------------

def _drop_row(i):
    return lambda m: m.drop(index=i).reset_index(drop=True)


def _set(i, column, value):
    def edit(m):
        m.loc[i, column] = value
        return m
    return edit


def _set_many(i, **values):
    def edit(m):
        for c, v in values.items():
            m.loc[i, c] = v
        return m
    return edit


# meta rows: 2 per well, train treatment wells first, reversed: rows 1-2 HUVEC-01_4_O23,
# rows 3-4 HUVEC-01_4_C05, rows 5-6 HUVEC-01_4_B02. ANY: the message names some row.
ANY = "any"
CASES = {
    "missing column": (lambda m: m.drop(columns="sirna_id"), None,
                       "missing column(s) sirna_id"),
    "empty value": (_set(4, "sirna", ""), 5, "empty value in column(s) sirna"),
    "dataset": (_set(4, "dataset", "valid"), 5, "dataset 'valid' is not one of train, test"),
    "experiment": (_set_many(0, experiment="HUVEC_01"), 1,
                   "experiment 'HUVEC_01' is not '<cell type>-<nn>'"),
    "cell_type": (_set(2, "cell_type", "RPE"), 3,
                  "cell_type 'RPE' disagrees with experiment HUVEC-01 (cell type HUVEC)"),
    "plate": (_set(2, "plate", "5"), 3, "plate '5' is not one of 1, 2, 3, 4"),
    "well": (_set(2, "well", "A01"), 3, "well 'A01' is not a usable well"),
    "site": (_set(3, "site", "3"), 4, "site '3' is not one of 1, 2"),
    "well_type": (_set(3, "well_type", "control"), 4, "well_type 'control' is not one of"),
    "sirna_id not an integer": (_set(3, "sirna_id", "7.0"), 4,
                                "sirna_id '7.0' is not an integer in 0..1138"),
    "sirna_id out of range": (_set(3, "sirna_id", "1139"), 4,
                              "sirna_id 1139 is outside 0..1138"),
    "treatment with a control id": (_set(3, "sirna_id", "1110"), 4,
                                    "sirna_id 1110 of a treatment well is outside 0..1107"),
    "control with a treatment id": (
        lambda m: _set(int(np.flatnonzero(m["well_type"] == "negative_control")[0]),
                       "sirna_id", "17")(m), "negative_control",
        "sirna_id 17 of a negative_control well is outside 1108..1138"),
    "well_id": (_set(2, "well_id", "HUVEC-01_4_B02"), 3,
                "well_id 'HUVEC-01_4_B02' disagrees with its columns"),
    "site_id": (_set(3, "site_id", "HUVEC-01_4_C05_1"), 4,
                "site_id 'HUVEC-01_4_C05_1' disagrees with well_id HUVEC-01_4_C05 and site 2"),
    "site listed twice": (lambda m: pd.concat([m, m.iloc[[3]]], ignore_index=True), None,
                          "appears in rows 4, "),
    "site missing": (_drop_row(3), 3, "has no site 2 row; every well needs both sites 1 and 2"),
    "well rows disagree on well_type": (
        _set_many(3, well_type="positive_control", sirna_id="1111", sirna="s21111"), 4,
        "well_type positive_control of well_id HUVEC-01_4_C05 disagrees with row 3 "
        "(well_type treatment); a well's rows may differ only in site and site_id"),
    "well rows disagree on sirna_id": (_set(3, "sirna_id", "5"), 4,
                                       "sirna_id 5 of well_id HUVEC-01_4_C05 disagrees with row 3"),
    "well rows disagree on dataset": (_set(3, "dataset", "test"), 4,
                                      "dataset test of well_id HUVEC-01_4_C05 disagrees"),
    "two ids for one sirna": (_set_many(slice(2, 3), sirna="s20000"), ANY,
                              "one sirna_id per sirna"),
    "two names for one sirna_id": (_set_many(slice(2, 3), sirna="sX"), ANY,
                                   "one sirna per sirna_id"),
    "experiment in both splits": (
        _set_many(slice(0, 1), dataset="test"), 3,
        "dataset train of experiment HUVEC-01 disagrees with row 1 (dataset test); an "
        "experiment belongs to one split"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_metadata_csv_one_line_naming_file_and_row(tmp_path, meta, case):
    edit, row, fragment = CASES[case]
    if row == "negative_control":  # its first row, found after the edit
        row = int(np.flatnonzero(meta["well_type"] == "negative_control")[0]) + 1
    data = write_release(tmp_path, edit(meta.copy()))
    with pytest.raises(MetadataError) as e:
        load_wells(data)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(os.path.join(data, "metadata.csv")), msg
    assert fragment in msg, (fragment, msg)
    if row is not None:
        assert re.search(rf", row {r'[0-9]+' if row == ANY else row}\b", msg), (row, msg)


def test_malformed_metadata_csv_through_the_cli(tmp_path, meta):
    data = write_release(tmp_path / "data", _set(3, "site", "3")(meta.copy()))
    p = subprocess.run([sys.executable, "-m", "prep", "folds", "--data-dir", data,
                        "--out-dir", str(tmp_path / "csv")], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert lines == [f"error: {os.path.join(data, 'metadata.csv')}, row 4 (site_id "
                     "HUVEC-01_4_C05_2): site '3' is not one of 1, 2"]
    assert not (tmp_path / "csv").exists()


def test_release_fast_on_real_size(tmp_path):
    # ~125k site rows, the size of the real metadata.csv: vectorised checks
    import time
    frames = make_layout(train_exps=[f"HUVEC-{i:02d}" for i in range(1, 34)],
                         test_exps=[f"RPE-{i:02d}" for i in range(1, 19)],
                         treatment_wells=tuple(f"{r}{c:02d}" for r in "CDEFGHIJKLM"
                                               for c in range(2, 24)))
    meta = release_frame(frames)
    data = write_release(tmp_path, meta)
    t = time.perf_counter()
    sites = load_sites(data)
    assert len(sites) == len(meta) == 2 * 51 * 4 * (11 * 22 + 2)
    assert time.perf_counter() - t < 5


@pytest.mark.parametrize("command", ["shards", "folds"])
def test_cli_on_a_directory_of_neither_layout(tmp_path, command):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "train").mkdir()
    p = subprocess.run([sys.executable, "-m", "prep", command, "--data-dir", str(data),
                        "--out-dir", str(tmp_path / "out")], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert len(lines) == 1 and lines[0].startswith(f"error: {data}: no RxRx1 metadata found; "
                                                   "looked for train.csv"), lines
    assert "metadata.csv with images/" in lines[0]
    assert not (tmp_path / "out").exists()
