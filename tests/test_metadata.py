"""shards.metadata: the wells and sites tables from the Kaggle CSVs, and the errors for bad CSVs."""
import os
import re
import subprocess
import sys

import pandas as pd
import pytest

from shards.layout import CONTROL_BASE, GROUP_SIZE, NEGATIVE_CONTROL
from shards.metadata import MetadataError, load_sites, load_wells

TREATMENT_WELLS = ("B02", "C05", "O23")
CONTROL_WELLS = {"B03": "positive_control", "N22": "negative_control"}


def make_layout(train_exps=("HEPG2-01", "HUVEC-01"), test_exps=("HEPG2-02", "U2OS-01"),
                treatment_wells=TREATMENT_WELLS):
    """The four well CSVs of a tiny RxRx1 layout as string frames, rows deliberately
    not in sorted order (reversed) so that sorting is tested."""
    def rows(exps, wells):
        return [(e, p, w) for e in exps for p in (1, 2, 3, 4) for w in wells]

    def frame(items, **extra):
        df = pd.DataFrame(items, columns=["experiment", "plate", "well"])
        df.insert(0, "id_code", df["experiment"] + "_" + df["plate"].astype(str) + "_" + df["well"])
        for k, v in extra.items():
            df[k] = v(df)
        return df.iloc[::-1].reset_index(drop=True).astype(str)

    def treatment_sirna(df):
        # plate p holds group p-1; each well its own siRNA in the group
        w = df["well"].map({w: i for i, w in enumerate(treatment_wells)})
        return (df["plate"] - 1) * GROUP_SIZE + w

    def control_sirna(df):
        return df["well"].map(lambda w: NEGATIVE_CONTROL if CONTROL_WELLS[w] == "negative_control"
                              else CONTROL_BASE + 3)

    def well_type(df):
        return df["well"].map(CONTROL_WELLS)

    return {
        "train.csv": frame(rows(train_exps, treatment_wells), sirna=treatment_sirna),
        "test.csv": frame(rows(test_exps, treatment_wells)),
        "train_controls.csv": frame(rows(train_exps, CONTROL_WELLS), sirna=control_sirna,
                                    well_type=well_type),
        "test_controls.csv": frame(rows(test_exps, CONTROL_WELLS), sirna=control_sirna,
                                   well_type=well_type),
    }


def write_layout(data_dir, frames):
    os.makedirs(data_dir, exist_ok=True)
    for name, df in frames.items():
        df.to_csv(os.path.join(data_dir, name), index=False)
    return str(data_dir)


def expect_error(tmp_path, frames, *fragments):
    """load_wells must raise MetadataError whose message holds every fragment
    (a fragment starting with 'row ' must match as a whole number)."""
    write_layout(tmp_path, frames)
    with pytest.raises(MetadataError) as info:
        load_wells(tmp_path)
    msg = str(info.value)
    for frag in fragments:
        if frag.startswith("row "):
            assert re.search(re.escape(frag) + r"\b", msg), (frag, msg)
        else:
            assert frag in msg, (frag, msg)
    return msg


# --- the happy path ---------------------------------------------------------

def test_load_wells_columns_dtypes_and_counts(tmp_path):
    wells = load_wells(write_layout(tmp_path, make_layout()))
    assert list(wells.columns) == ["split", "id_code", "experiment", "cell_type", "plate",
                                   "well", "sirna", "well_type", "sirna_name"]
    assert (wells["sirna_name"] == "").all()  # the Kaggle files carry no ThermoFisher names
    assert wells["plate"].dtype == "int64" and wells["sirna"].dtype == "int64"
    for c in ("split", "id_code", "experiment", "cell_type", "well", "well_type"):
        assert pd.api.types.is_string_dtype(wells[c]), c
    # 2 experiments x 4 plates x (3 treatment + 2 control) wells per split
    assert (wells["split"] == "train").sum() == 40 and (wells["split"] == "test").sum() == 40
    assert list(wells.index) == list(range(80))


def test_load_wells_sorted_by_split_experiment_plate_well(tmp_path):
    wells = load_wells(write_layout(tmp_path, make_layout()))
    assert list(wells["split"].unique()) == ["train", "test"]  # layout.SPLITS order
    key = list(zip(wells["split"].map({"train": 0, "test": 1}), wells["experiment"],
                   wells["plate"], wells["well"]))
    assert key == sorted(key)
    assert wells["id_code"].iloc[0] == "HEPG2-01_1_B02"
    assert wells["id_code"].iloc[1] == "HEPG2-01_1_B03"   # a control, sorted in among treatments
    assert wells["id_code"].iloc[-1] == "U2OS-01_4_O23"


def test_load_wells_labels_and_well_types(tmp_path):
    wells = load_wells(write_layout(tmp_path, make_layout())).set_index("id_code")
    assert wells.loc["HEPG2-01_3_C05", "sirna"] == 2 * GROUP_SIZE + 1
    assert wells.loc["HEPG2-01_3_C05", "well_type"] == "treatment"
    assert wells.loc["HUVEC-01_2_N22", "sirna"] == NEGATIVE_CONTROL
    assert wells.loc["HUVEC-01_2_N22", "well_type"] == "negative_control"
    assert wells.loc["U2OS-01_1_B03", "well_type"] == "positive_control"
    assert wells.loc["U2OS-01_1_B03", "sirna"] == CONTROL_BASE + 3
    test_treat = wells[(wells["split"] == "test") & (wells["well_type"] == "treatment")]
    assert len(test_treat) == 24 and (test_treat["sirna"] == -1).all()
    assert wells.loc["U2OS-01_4_O23", "cell_type"] == "U2OS"
    assert wells.loc["HUVEC-01_1_B02", "cell_type"] == "HUVEC"
    assert wells.loc["HUVEC-01_1_B02", "plate"] == 1


def test_load_sites_two_sites_per_well_in_format_order(tmp_path):
    data = write_layout(tmp_path, make_layout())
    wells, sites = load_wells(data), load_sites(data)
    assert list(sites.columns) == ["row", "split", "id_code", "experiment", "cell_type",
                                   "plate", "well", "site", "sirna", "well_type", "sirna_name"]
    assert len(sites) == 2 * len(wells)
    assert sites["row"].tolist() == list(range(len(sites)))
    assert sites["row"].dtype == "int64" and sites["site"].dtype == "int64"
    assert sites["site"].tolist() == [1, 2] * len(wells)
    assert sites["id_code"].iloc[::2].tolist() == wells["id_code"].tolist()
    assert sites["id_code"].iloc[1::2].tolist() == wells["id_code"].tolist()
    assert sites.iloc[3][["id_code", "site", "sirna"]].tolist() == ["HEPG2-01_1_B03", 2,
                                                                    CONTROL_BASE + 3]


def test_extra_columns_and_blanks_are_tolerated(tmp_path):
    frames = make_layout()
    frames["train.csv"]["note"] = "x"
    frames["train.csv"]["well"] = " " + frames["train.csv"]["well"] + " "
    wells = load_wells(write_layout(tmp_path, frames))
    assert "note" not in wells.columns
    assert "HEPG2-01_1_B02" in set(wells["id_code"])


# --- bad input --------------------------------------------------------------

def test_missing_file_names_path_and_needed_files(tmp_path):
    write_layout(tmp_path, make_layout())
    os.remove(tmp_path / "test_controls.csv")
    with pytest.raises(MetadataError) as info:
        load_wells(tmp_path)
    msg = str(info.value)
    assert str(tmp_path / "test_controls.csv") in msg
    assert all(n in msg for n in ("train.csv", "test.csv", "train_controls.csv"))


def test_missing_column_lists_missing_and_found(tmp_path):
    frames = make_layout()
    frames["train.csv"] = frames["train.csv"].drop(columns=["sirna"])
    msg = expect_error(tmp_path, frames, "train.csv", "missing column(s) sirna")
    assert "found columns id_code, experiment, plate, well" in msg


def test_empty_file(tmp_path):
    write_layout(tmp_path, make_layout())
    (tmp_path / "test.csv").write_text("")
    expect_error(tmp_path, {}, "test.csv", "empty")


def test_empty_cell(tmp_path):
    frames = make_layout()
    frames["test.csv"].loc[4, "well"] = ""
    expect_error(tmp_path, frames, "test.csv", "row 5", frames["test.csv"].loc[4, "id_code"],
                 "empty value in column(s) well")


def test_duplicate_id_code_within_file(tmp_path):
    frames = make_layout()
    df = frames["train.csv"]
    frames["train.csv"] = pd.concat([df, df.iloc[[2]]], ignore_index=True)
    expect_error(tmp_path, frames, "train.csv", df.loc[2, "id_code"],
                 f"rows 3, {len(df) + 1}")


def test_control_well_also_in_train_csv(tmp_path):
    frames = make_layout()
    ctrl = frames["train_controls.csv"].iloc[[0]].drop(columns=["well_type"])
    ctrl["sirna"] = "5"
    frames["train.csv"] = pd.concat([frames["train.csv"], ctrl], ignore_index=True)
    n = len(frames["train.csv"])
    expect_error(tmp_path, frames, ctrl["id_code"].iloc[0], f"train.csv row {n}",
                 "train_controls.csv row 1")


@pytest.mark.parametrize("column,value,problem", [
    ("id_code", "HEPG2-01_1_B99", "disagrees with its columns"),
    ("experiment", "HEPG2_01", "is not '<cell type>-<nn>'"),
    ("plate", "5", "plate '5' is not one of 1, 2, 3, 4"),
    ("plate", "x", "plate 'x'"),
    ("well", "A01", "well 'A01' is not a usable well"),
    ("well", "P24", "well 'P24'"),
])
def test_bad_well_columns(tmp_path, column, value, problem):
    frames = make_layout()
    id_code = frames["train.csv"].loc[6, "id_code"]
    frames["train.csv"].loc[6, column] = value
    expect_error(tmp_path, frames, "train.csv", "row 7", problem,
                 value if column == "id_code" else id_code)


def test_id_code_disagreeing_names_expected(tmp_path):
    frames = make_layout()
    frames["test_controls.csv"].loc[0, "id_code"] = "U2OS-01_4_N21"  # really U2OS-01_4_N22
    expect_error(tmp_path, frames, "test_controls.csv", "row 1", "'U2OS-01_4_N21'",
                 "expected U2OS-01_4_N22")


@pytest.mark.parametrize("name,value,problem", [
    ("train.csv", "1108", "sirna 1108 is outside 0..1107"),
    ("train.csv", "5000", "sirna 5000 is outside 0..1107"),   # beyond the controls too
    ("train.csv", "-1", "sirna '-1' is not an integer"),
    ("train.csv", "3.5", "sirna '3.5' is not an integer"),
    ("train.csv", "abc", "sirna 'abc'"),
    ("train_controls.csv", "1107", "sirna 1107 is outside 1108..1138"),
    ("test_controls.csv", "1139", "sirna 1139 is outside 1108..1138"),
])
def test_bad_sirna(tmp_path, name, value, problem):
    frames = make_layout()
    frames[name].loc[1, "sirna"] = value
    expect_error(tmp_path, frames, name, "row 2", frames[name].loc[1, "id_code"], problem)


def test_control_sirna_in_train_csv_points_to_controls_file(tmp_path):
    frames = make_layout()
    frames["train.csv"].loc[0, "sirna"] = "1120"
    expect_error(tmp_path, frames, "train.csv", "row 1", "belong in train_controls.csv")


def test_same_well_under_two_id_codes(tmp_path):
    frames = make_layout()
    df = frames["train.csv"]
    extra = df.iloc[[0]].copy()
    extra["id_code"] = "HUVEC-01_4_O23x"
    frames["train.csv"] = pd.concat([df, extra], ignore_index=True)
    expect_error(tmp_path, frames, "train.csv", "listed twice", "row 1",
                 f"row {len(df) + 1}", "HUVEC-01_4_O23x", df.loc[0, "id_code"])


def test_bad_control_well_type(tmp_path):
    frames = make_layout()
    frames["train_controls.csv"].loc[3, "well_type"] = "treatment"
    expect_error(tmp_path, frames, "train_controls.csv", "row 4",
                 frames["train_controls.csv"].loc[3, "id_code"], "well_type 'treatment'",
                 "positive_control")


def test_experiment_in_train_and_test(tmp_path):
    frames = make_layout(train_exps=("HEPG2-01", "HUVEC-01"), test_exps=("HEPG2-01",))
    msg = expect_error(tmp_path, frames, "HEPG2-01", "both train and test")
    assert "train.csv" in msg and "test.csv" in msg


def test_load_wells_fast_on_real_size(tmp_path):
    # ~62k wells, the size of the real data: vectorised checks keep this well under 10 s
    import time
    frames = make_layout(train_exps=[f"HUVEC-{i:02d}" for i in range(1, 34)],
                         test_exps=[f"RPE-{i:02d}" for i in range(1, 19)],
                         treatment_wells=tuple(f"{r}{c:02d}" for r in "CDEFGHIJKLM"
                                               for c in range(2, 24)))
    data = write_layout(tmp_path, frames)
    t = time.perf_counter()
    sites = load_sites(data)
    assert len(sites) == 2 * 51 * 4 * (11 * 22 + 2)
    assert time.perf_counter() - t < 5


def test_load_sites_on_synthetic_tiny(tmp_path):
    out = tmp_path / "tiny"
    # smallest images and two experiments (one per split): only the CSVs matter here
    subprocess.run([sys.executable, "-m", "prep", "synth", "--preset", "tiny", "--out-dir",
                    str(out), "--image-size", "32", "--experiments", "2", "--workers", "2"],
                   check=True, capture_output=True,
                   cwd=os.path.join(os.path.dirname(__file__), ".."))
    wells, sites = load_wells(out), load_sites(out)
    assert list(sites.columns) == ["row", "split", "id_code", "experiment", "cell_type",
                                   "plate", "well", "site", "sirna", "well_type", "sirna_name"]
    assert set(wells["split"]) == {"train", "test"}
    assert len(wells) > 0 and len(sites) == 2 * len(wells)
    assert (sites.groupby("id_code")["site"].apply(sorted) == pd.Series(
        [[1, 2]] * len(wells), index=sorted(wells["id_code"]))).all()


def test_read_labelled_wells_refuses_unknown_sirna(tmp_path):
    # A fold CSV row with sirna 5000 was dropped as if it were a control.
    from shards.metadata import read_labelled_wells
    path = tmp_path / "train_0.csv"
    path.write_text("id_code,experiment,sirna\nHEPG2-01_1_B02,HEPG2-01,7\n"
                    "HEPG2-01_1_B03,HEPG2-01,1108\nHEPG2-01_1_B04,HEPG2-01,5000\n")
    with pytest.raises(MetadataError, match=re.escape(f"{path}, row 3 (id_code "
                                                      "HEPG2-01_1_B04): sirna 5000 is outside")):
        read_labelled_wells(path)
    path.write_text("id_code,sirna\nHEPG2-01_1_B02,7\nHEPG2-01-1-B03,8\n")
    with pytest.raises(MetadataError, match="row 2 .*is not '<experiment>_<plate>_<well>'"):
        read_labelled_wells(path)
    path.write_text("id_code,sirna\nHEPG2-01_1_B02,7\nHEPG2-01_1_B03,1138\n")
    df = read_labelled_wells(path)
    assert df["sirna"].tolist() == [7, 1138] and df["sirna"].dtype == "int64"


def test_missing_file_hint_points_to_docs(tmp_path):
    with pytest.raises(MetadataError, match="docs/data.md"):
        load_wells(tmp_path)
    # the hint names the project's own docs, never a design file users do not have
    assert os.path.isfile(os.path.join(os.path.dirname(__file__), "..", "docs", "data.md"))
