"""Read and validate the RxRx1 metadata, in either layout, into a wells table and a sites table.

The data directory's layout is detected (shards.source_layout): the Kaggle
competition's four well CSVs, or rxrx.ai's `metadata.csv` (one row per site,
read by shards.release_metadata). Both give the same tables for the same data:
the release's public test labels are kept out of them (`sirna` -1 and
`sirna_name` '' for test treatment wells, as the Kaggle files have them), so the
store does not depend on the layout; `read_test_labels` reads those labels for
scoring. The Kaggle files carry no ThermoFisher names: `sirna_name` is '' there.

`load_sites` is the sites table of docs/format.md: its row order is the row
order of every array in the store, so it must not depend on the order of rows
in the CSVs.  Bad input raises `MetadataError` naming the file, the row (1-based
data row, the header not counted) or id_code, and what is wrong; the checks are
vectorised so the real data (~62k wells) loads in well under a second.
"""
from __future__ import annotations

import os

import numpy as np
import pandas as pd

from shards.csv_checks import (check_experiments, check_int_column, check_unique, is_id_code,
                               raise_if, read_csv_checked)
from shards.layout import (CONTROL_BASE, KAGGLE_CSVS, N_SIRNAS, N_TREATMENTS, PLATES, RELEASE,
                           RELEASE_CSV, SITES, SPLITS, WELLS, cell_type_of)
from shards.release_metadata import read_release_wells
from shards.source_layout import MetadataError, detect_layout

# MetadataError and read_csv_checked are part of this module's interface.
__all__ = ["MetadataError", "read_csv_checked", "read_labelled_wells", "load_wells",
           "load_sites", "source_test_ids", "read_test_labels", "WELLS_TABLE_COLUMNS",
           "SITES_TABLE_COLUMNS"]

WELL_COLUMNS = ("id_code", "experiment", "plate", "well")
CONTROL_WELL_TYPES = ("positive_control", "negative_control")

# file name -> (split, whether it lists controls, the columns it must have)
WELL_CSVS = {
    "train.csv": ("train", False, WELL_COLUMNS + ("sirna",)),
    "test.csv": ("test", False, WELL_COLUMNS),
    "train_controls.csv": ("train", True, WELL_COLUMNS + ("sirna", "well_type")),
    "test_controls.csv": ("test", True, WELL_COLUMNS + ("sirna", "well_type")),
}
assert tuple(WELL_CSVS) == KAGGLE_CSVS

# sirna_name last: the columns before it are format version 1's, in their order.
WELLS_TABLE_COLUMNS = ("split", "id_code", "experiment", "cell_type", "plate", "well",
                       "sirna", "well_type", "sirna_name")
SITES_TABLE_COLUMNS = ("row", "split", "id_code", "experiment", "cell_type", "plate", "well",
                       "site", "sirna", "well_type", "sirna_name")
TEST_LABEL_COLUMNS = ("id_code", "experiment", "cell_type", "plate", "well", "well_type",
                      "sirna", "sirna_name")


def read_labelled_wells(path: str | os.PathLike) -> pd.DataFrame:
    """A CSV of labelled wells (a fold's train_k.csv / valid_k.csv): id_code and sirna
    checked row by row. `sirna` becomes int64 and must be a treatment
    (0..1107) or a control (1108..1138); `id_code` must be
    `<experiment>_<plate>_<well>`. Anything else is a MetadataError naming the file,
    the row and the value, never a row silently dropped."""
    path = str(path)
    df = read_csv_checked(path, ("id_code", "sirna"))
    bad_id = [not is_id_code(c) for c in df["id_code"]]
    raise_if(path, df, pd.Series(bad_id, index=df.index),
             lambda r: f"id_code {r['id_code']!r} is not '<experiment>_<plate>_<well>' "
                       "(e.g. HEPG2-01_1_B03)")
    check_int_column(path, df, "sirna", 0, N_SIRNAS - 1,
                     f" (treatments 0..{N_TREATMENTS - 1}, controls {CONTROL_BASE}.."
                     f"{N_SIRNAS - 1})")
    check_unique(path, df, "id_code", "each well must be listed once")
    return df


def load_wells(data_dir: str | os.PathLike) -> pd.DataFrame:
    """One row per well of the data directory, in either layout.

    Columns: split, id_code, experiment, cell_type, plate (int), well, sirna
    (int class id; -1 for test treatment wells, whose labels the store must not
    hold), well_type, sirna_name (ThermoFisher id; '' where the source has none:
    the Kaggle layout, and test treatment wells).
    Sorted by split (train first, as in layout.SPLITS), experiment, plate, well.
    """
    wells = _source_wells(data_dir)
    wells["_split_rank"] = wells["split"].map({s: i for i, s in enumerate(SPLITS)})
    wells = wells.sort_values(["_split_rank", "experiment", "plate", "well"],
                              kind="stable", ignore_index=True)
    return wells[list(WELLS_TABLE_COLUMNS)].copy()


def load_sites(data_dir: str | os.PathLike) -> pd.DataFrame:
    """The sites table of docs/format.md: every well of `load_wells` once per site,
    ordered by split, experiment, plate, well, site, with `row` = 0..n-1 first."""
    wells = load_wells(data_dir)
    sites = wells.loc[wells.index.repeat(len(SITES))].reset_index(drop=True)
    sites.insert(sites.columns.get_loc("well") + 1, "site",
                 np.tile(np.asarray(SITES, dtype=np.int64), len(wells)))
    sites.insert(0, "row", np.arange(len(sites), dtype=np.int64))
    return sites[list(SITES_TABLE_COLUMNS)]


def source_test_ids(data_dir: str | os.PathLike) -> list[str]:
    """The id_codes of the test treatment wells in the order the source lists them
    (test.csv's rows, or metadata.csv's site-1 rows): the order of prediction files."""
    wells = _source_wells(data_dir)
    test = wells[(wells["split"] == "test") & (wells["well_type"] == "treatment")]
    return test["id_code"].tolist()


def read_test_labels(path: str | os.PathLike, well_types=("treatment",)) -> pd.DataFrame:
    """The public test labels of the release: one row per test well of `well_types`
    (treatment wells by default), from its two site rows in `path` (a metadata.csv, or
    a data directory holding one), validated as strictly as `load_wells` does.

    Columns: id_code, experiment, cell_type, plate (int), well, well_type, sirna (int
    class id), sirna_name (ThermoFisher id); rows in the file's order."""
    path = str(path)
    if os.path.isdir(path):
        path = os.path.join(path, RELEASE_CSV)
    wells = read_release_wells(path)
    test = wells[(wells["split"] == "test") & wells["well_type"].isin(list(well_types))].copy()
    if test.empty:
        raise MetadataError(f"{path}: no test wells of type {', '.join(well_types)}; test "
                            "labels come from the rxrx.ai release's metadata.csv (dataset test)")
    _add_cell_type(test)
    return test[list(TEST_LABEL_COLUMNS)].reset_index(drop=True)


def _source_wells(data_dir) -> pd.DataFrame:
    """The wells of either layout, validated, in the source's own order, with the
    columns of WELLS_TABLE_COLUMNS (and `_file`, `_row`)."""
    data_dir = str(data_dir)
    if detect_layout(data_dir) == RELEASE:
        wells = read_release_wells(os.path.join(data_dir, RELEASE_CSV))
        # The release's test labels stay out of the tables, as in the Kaggle files:
        # the store and everything trained on it are the same from either layout.
        hidden = (wells["split"] == "test") & (wells["well_type"] == "treatment")
        wells.loc[hidden, "sirna"] = -1
        wells.loc[hidden, "sirna_name"] = ""
    else:
        wells = pd.concat([_read_well_csv(os.path.join(data_dir, name), name)
                           for name in WELL_CSVS], ignore_index=True)
        _check_across_files(wells)
        wells["sirna_name"] = ""  # the competition files hold class ids only
    if wells.empty:
        named = RELEASE_CSV if detect_layout(data_dir) == RELEASE else ", ".join(WELL_CSVS)
        raise MetadataError(f"{data_dir}: no sites listed (only a header in {named}); "
                            "point --data-dir at the data set's CSVs")
    _check_plate_sirnas(wells, data_dir)
    _add_cell_type(wells)
    for c in ("split", "id_code", "experiment", "cell_type", "well", "well_type", "sirna_name"):
        wells[c] = wells[c].astype(str)
    for c in ("plate", "sirna"):
        wells[c] = wells[c].astype(np.int64)
    return wells


def _add_cell_type(wells: pd.DataFrame) -> None:
    wells["cell_type"] = wells["experiment"].map(
        {e: cell_type_of(e) for e in wells["experiment"].unique()})


def _read_well_csv(path: str, name: str) -> pd.DataFrame:
    """One of the four well CSVs, validated on its own, with `_file` and `_row`
    kept so that checks across files can still point at a row."""
    split, is_control, columns = WELL_CSVS[name]
    df = read_csv_checked(path, columns)
    df = df[list(columns)].copy()

    check_experiments(path, df)
    # Compared as text: the id_code spells the plate as a bare digit.
    raise_if(path, df, ~df["plate"].isin([str(p) for p in PLATES]),
             lambda r: f"plate {r['plate']!r} is not one of {', '.join(map(str, PLATES))}")
    df["plate"] = df["plate"].astype(np.int64)
    raise_if(path, df, ~df["well"].isin(WELLS),
             lambda r: f"well {r['well']!r} is not a usable well (rows B-O, columns 02-23, "
                       "e.g. B02)")

    if "sirna" in columns:
        lo, hi = (CONTROL_BASE, N_SIRNAS - 1) if is_control else (0, N_TREATMENTS - 1)
        hint = ("" if is_control else
                f"; controls ({CONTROL_BASE}..{N_SIRNAS - 1}) belong in {split}_controls.csv")
        check_int_column(path, df, "sirna", lo, hi, hint)
    else:
        df["sirna"] = np.int64(-1)  # test labels are what the pipeline predicts

    if is_control:
        raise_if(path, df, ~df["well_type"].isin(CONTROL_WELL_TYPES),
                 lambda r: f"well_type {r['well_type']!r} is not one of "
                           f"{', '.join(CONTROL_WELL_TYPES)}")
    else:
        df["well_type"] = "treatment"

    _check_unique(path, df)
    expected = df["experiment"] + "_" + df["plate"].astype(str) + "_" + df["well"]
    raise_if(path, df, df["id_code"] != expected,
             lambda r: f"id_code {r['id_code']!r} disagrees with its columns experiment="
                       f"{r['experiment']}, plate={r['plate']}, well={r['well']} (expected "
                       f"{r['experiment']}_{r['plate']}_{r['well']}); fix whichever is wrong")

    df["split"] = split
    df["_file"] = name
    df["_row"] = df.index + 1
    return df


def _check_unique(path: str, df: pd.DataFrame) -> None:
    check_unique(path, df, "id_code", "each well must be listed once")
    key = ["experiment", "plate", "well"]
    dup = df.duplicated(key, keep=False)
    if dup.any():
        first = df[dup].iloc[0]
        same = df[(df[key] == first[key]).all(axis=1)]
        listing = ", ".join(f"row {i + 1} (id_code {c})" for i, c in same["id_code"].items())
        raise MetadataError(f"{path}: well {first['well']} of {first['experiment']} plate "
                            f"{first['plate']} is listed twice: {listing}; remove the extra row")


def _check_plate_sirnas(wells: pd.DataFrame, data_dir: str) -> None:
    """A plate holds each treatment siRNA once: the plate groups and the one-to-one
    assignment rest on it, and a repeat merges two groups (a hand-edited row)."""
    known = wells[(wells["well_type"] == "treatment") & (wells["sirna"].astype(np.int64) >= 0)]
    dup = known.duplicated(["experiment", "plate", "sirna"], keep=False)
    if not dup.any():
        return
    first = known[dup].iloc[0]
    same = known[dup & (known["experiment"] == first["experiment"])
                 & (known["plate"] == first["plate"]) & (known["sirna"] == first["sirna"])]
    where = (f"{first['_file']} rows " + ", ".join(str(r) for r in same["_row"])
             if "_file" in known.columns else os.path.join(data_dir, RELEASE_CSV))
    raise MetadataError(f"{where}: plate {first['plate']} of {first['experiment']} holds siRNA "
                        f"{first['sirna']} twice (wells {', '.join(same['well'])}); a plate "
                        "holds each siRNA once — fix the edited row"
                        + (f" ({int(dup.sum()) - len(same)} more repeated row(s))"
                           if int(dup.sum()) > len(same) else ""))


def _check_across_files(wells: pd.DataFrame) -> None:
    # Split overlap first: it would otherwise surface as a confusing duplicate id_code.
    by_split = {s: set(wells.loc[wells["split"] == s, "experiment"]) for s in SPLITS}
    both = sorted(by_split["train"] & by_split["test"])
    if both:
        e = both[0]
        where = " and ".join(
            f"{f} row {r}" for f, r in
            wells[wells["experiment"] == e].groupby("split", sort=False)[["_file", "_row"]]
            .first().itertuples(index=False))
        raise MetadataError(f"experiment {e} appears in both train and test files ({where}); "
                            f"an experiment belongs to one split"
                            + (f" (also: {', '.join(both[1:])})" if len(both) > 1 else ""))

    dup = wells["id_code"].duplicated(keep=False)
    if dup.any():
        id_code = wells.loc[dup, "id_code"].iloc[0]
        where = " and ".join(f"{f} row {r}" for f, r in
                             wells.loc[wells["id_code"] == id_code, ["_file", "_row"]]
                             .itertuples(index=False))
        raise MetadataError(f"id_code {id_code} appears in {where}; a well is either a "
                            "treatment or a control of one split, remove it from one file")
    # A well repeated across files under another id_code cannot reach here: each
    # file already checked that its id_codes agree with experiment/plate/well.

