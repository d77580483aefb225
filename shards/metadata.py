"""Read and validate the Kaggle CSVs of the RxRx1 layout into a wells table and a sites table.

`load_sites` is the sites table of docs/format.md: its row order is the row
order of every array in the store, so it must not depend on the order of rows
in the CSVs.  Bad input raises `MetadataError` naming the file, the row (1-based
data row, the header not counted) or id_code, and what is wrong; the checks are
vectorised so the real data (~62k wells) loads in well under a second, and rows
are visited one by one only to word the message for the first bad one.
"""
from __future__ import annotations

from common.errors import BadInput

import os
from typing import Sequence

import numpy as np
import pandas as pd

from shards.layout import (
    CONTROL_BASE,
    N_SIRNAS,
    N_TREATMENTS,
    PLATES,
    SITES,
    SPLITS,
    WELLS,
    cell_type_of,
    parse_id_code,
)


class MetadataError(BadInput):
    """A metadata CSV is missing, malformed or inconsistent with the RxRx1 layout."""


WELL_COLUMNS = ("id_code", "experiment", "plate", "well")
CONTROL_WELL_TYPES = ("positive_control", "negative_control")

# file name -> (split, whether it lists controls, the columns it must have)
WELL_CSVS = {
    "train.csv": ("train", False, WELL_COLUMNS + ("sirna",)),
    "test.csv": ("test", False, WELL_COLUMNS),
    "train_controls.csv": ("train", True, WELL_COLUMNS + ("sirna", "well_type")),
    "test_controls.csv": ("test", True, WELL_COLUMNS + ("sirna", "well_type")),
}

WELLS_TABLE_COLUMNS = ("split", "id_code", "experiment", "cell_type", "plate", "well",
                       "sirna", "well_type")
SITES_TABLE_COLUMNS = ("row", "split", "id_code", "experiment", "cell_type", "plate", "well",
                       "site", "sirna", "well_type")

_NEEDED_FILES_HINT = ("the RxRx1 layout needs " + ", ".join(WELL_CSVS)
                      + " in the data directory (see docs/data.md)")


def read_csv_checked(path: str | os.PathLike, required_columns: Sequence[str]) -> pd.DataFrame:
    """Read a CSV as strings, checking that it exists, parses, has the required
    columns and no empty cell in them.

    Values of the required columns are stripped of surrounding blanks.  The
    index is the 0-based data row, so `index + 1` is the row a person sees
    after the header; extra columns are kept untouched.
    """
    path = str(path)
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise MetadataError(f"{path}: file not found; {_NEEDED_FILES_HINT}"
                            if name in WELL_CSVS else f"{path}: file not found")
    try:
        # Everything as text: ids like '01' must not turn into numbers, and
        # empty cells must stay visible as '' rather than NaN.
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise MetadataError(f"{path}: file is empty; expected a header with columns "
                            f"{', '.join(required_columns)}") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise MetadataError(f"{path}: not a readable CSV ({e})") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in required_columns if c not in df.columns]
    if missing:
        raise MetadataError(f"{path}: missing column(s) {', '.join(missing)}; found columns "
                            f"{', '.join(df.columns)}; expected {', '.join(required_columns)}")
    for c in required_columns:
        # Short rows come back as NaN even with keep_default_na=False.
        df[c] = df[c].fillna("").astype(str).str.strip()
    empty = (df[list(required_columns)] == "").to_numpy()
    bad = empty.any(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        cols = [c for c, e in zip(required_columns, empty[i]) if e]
        raise _row_error(path, df, bad, f"empty value in column(s) {', '.join(cols)}",
                         "fill in the value or remove the row")
    return df


def read_labelled_wells(path: str | os.PathLike) -> pd.DataFrame:
    """A CSV of labelled wells (a fold's train_k.csv / valid_k.csv): id_code and sirna
    checked row by row. `sirna` becomes int64 and must be a treatment
    (0..1107) or a control (1108..1138); `id_code` must be
    `<experiment>_<plate>_<well>`. Anything else is a MetadataError naming the file,
    the row and the value, never a row silently dropped."""
    path = str(path)
    df = read_csv_checked(path, ("id_code", "sirna"))
    bad_id = [not _is_id_code(c) for c in df["id_code"]]
    _raise_if(path, df, pd.Series(bad_id, index=df.index),
              lambda r: f"id_code {r['id_code']!r} is not '<experiment>_<plate>_<well>' "
                        "(e.g. HEPG2-01_1_B03)")
    is_int = df["sirna"].str.fullmatch(r"\d{1,18}")
    _raise_if(path, df, ~is_int,
              lambda r: f"sirna {r['sirna']!r} is not an integer in 0..{N_SIRNAS - 1}")
    df["sirna"] = df["sirna"].astype(np.int64)
    _raise_if(path, df, df["sirna"] > N_SIRNAS - 1,
              lambda r: f"sirna {r['sirna']} is outside 0..{N_SIRNAS - 1} (treatments "
                        f"0..{N_TREATMENTS - 1}, controls {CONTROL_BASE}..{N_SIRNAS - 1})")
    _check_unique_ids(path, df)
    return df


def _is_id_code(value: str) -> bool:
    try:
        experiment, _, well = parse_id_code(value)
    except ValueError:
        return False
    return bool(experiment) and bool(well)


def load_wells(data_dir: str | os.PathLike) -> pd.DataFrame:
    """One row per well of train.csv, test.csv, train_controls.csv and test_controls.csv.

    Columns: split, id_code, experiment, cell_type, plate (int), well, sirna
    (int; -1 for test treatment wells, whose labels are unknown), well_type.
    Sorted by split (train first, as in layout.SPLITS), experiment, plate, well.
    """
    frames = [_read_well_csv(os.path.join(str(data_dir), name), name)
              for name in WELL_CSVS]
    wells = pd.concat(frames, ignore_index=True)
    _check_across_files(wells)

    wells["cell_type"] = wells["experiment"].map(
        {e: cell_type_of(e) for e in wells["experiment"].unique()})
    wells["_split_rank"] = wells["split"].map({s: i for i, s in enumerate(SPLITS)})
    wells = wells.sort_values(["_split_rank", "experiment", "plate", "well"],
                              kind="stable", ignore_index=True)
    out = wells[list(WELLS_TABLE_COLUMNS)].copy()
    for c in ("split", "id_code", "experiment", "cell_type", "well", "well_type"):
        out[c] = out[c].astype(str)
    for c in ("plate", "sirna"):
        out[c] = out[c].astype(np.int64)
    return out


def load_sites(data_dir: str | os.PathLike) -> pd.DataFrame:
    """The sites table of docs/format.md: every well of `load_wells` once per site,
    ordered by split, experiment, plate, well, site, with `row` = 0..n-1 first."""
    wells = load_wells(data_dir)
    sites = wells.loc[wells.index.repeat(len(SITES))].reset_index(drop=True)
    sites.insert(sites.columns.get_loc("well") + 1, "site",
                 np.tile(np.asarray(SITES, dtype=np.int64), len(wells)))
    sites.insert(0, "row", np.arange(len(sites), dtype=np.int64))
    return sites[list(SITES_TABLE_COLUMNS)]


def _read_well_csv(path: str, name: str) -> pd.DataFrame:
    """One of the four well CSVs, validated on its own, with `_file` and `_row`
    kept so that checks across files can still point at a row."""
    split, is_control, columns = WELL_CSVS[name]
    df = read_csv_checked(path, columns)
    df = df[list(columns)].copy()

    _check_experiments(path, df)
    # Compared as text: the id_code spells the plate as a bare digit.
    _raise_if(path, df, ~df["plate"].isin([str(p) for p in PLATES]),
              lambda r: f"plate {r['plate']!r} is not one of {', '.join(map(str, PLATES))}")
    df["plate"] = df["plate"].astype(np.int64)
    _raise_if(path, df, ~df["well"].isin(WELLS),
              lambda r: f"well {r['well']!r} is not a usable well (rows B-O, columns 02-23, "
                        "e.g. B02)")

    if "sirna" in columns:
        lo, hi = (CONTROL_BASE, N_SIRNAS - 1) if is_control else (0, N_TREATMENTS - 1)
        hint = ("" if is_control else
                f"; controls ({CONTROL_BASE}..{N_SIRNAS - 1}) belong in {split}_controls.csv")
        is_int = df["sirna"].str.fullmatch(r"\d{1,18}")  # 18 digits fit int64
        _raise_if(path, df, ~is_int,
                  lambda r: f"sirna {r['sirna']!r} is not an integer in {lo}..{hi}")
        df["sirna"] = df["sirna"].astype(np.int64)
        _raise_if(path, df, (df["sirna"] < lo) | (df["sirna"] > hi),
                  lambda r: f"sirna {r['sirna']} is outside {lo}..{hi}{hint}")
    else:
        df["sirna"] = np.int64(-1)  # test labels are what the pipeline predicts

    if is_control:
        _raise_if(path, df, ~df["well_type"].isin(CONTROL_WELL_TYPES),
                  lambda r: f"well_type {r['well_type']!r} is not one of "
                            f"{', '.join(CONTROL_WELL_TYPES)}")
    else:
        df["well_type"] = "treatment"

    _check_unique(path, df)
    expected = df["experiment"] + "_" + df["plate"].astype(str) + "_" + df["well"]
    _raise_if(path, df, df["id_code"] != expected,
              lambda r: f"id_code {r['id_code']!r} disagrees with its columns experiment="
                        f"{r['experiment']}, plate={r['plate']}, well={r['well']} (expected "
                        f"{r['experiment']}_{r['plate']}_{r['well']}); fix whichever is wrong")

    df["split"] = split
    df["_file"] = name
    df["_row"] = df.index + 1
    return df


def _check_experiments(path: str, df: pd.DataFrame) -> None:
    # Few distinct experiments, so parsing each name once is cheap.
    bad = []
    for e in df["experiment"].unique():
        try:
            cell_type_of(e)
        except ValueError:
            bad.append(e)
    _raise_if(path, df, df["experiment"].isin(bad),
              lambda r: f"experiment {r['experiment']!r} is not '<cell type>-<nn>' "
                        "(e.g. HEPG2-01)")


def _check_unique_ids(path: str, df: pd.DataFrame) -> None:
    dup = df["id_code"].duplicated(keep=False)
    if dup.any():
        id_code = df.loc[dup, "id_code"].iloc[0]
        rows = (df.index[df["id_code"] == id_code] + 1).tolist()
        raise MetadataError(f"{path}: id_code {id_code} appears in rows "
                            f"{', '.join(map(str, rows))}; each well must be listed once")


def _check_unique(path: str, df: pd.DataFrame) -> None:
    _check_unique_ids(path, df)
    key = ["experiment", "plate", "well"]
    dup = df.duplicated(key, keep=False)
    if dup.any():
        first = df[dup].iloc[0]
        same = df[(df[key] == first[key]).all(axis=1)]
        listing = ", ".join(f"row {i + 1} (id_code {c})" for i, c in same["id_code"].items())
        raise MetadataError(f"{path}: well {first['well']} of {first['experiment']} plate "
                            f"{first['plate']} is listed twice: {listing}; remove the extra row")


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


def _raise_if(path: str, df: pd.DataFrame, bad: pd.Series, describe) -> None:
    """Raise for the first row where `bad` holds; `describe(row)` words the problem."""
    if bad.any():
        raise _row_error(path, df, bad, describe(df[bad.to_numpy()].iloc[0]))


def _row_error(path: str, df: pd.DataFrame, bad, problem: str, hint: str = "") -> MetadataError:
    bad = np.asarray(bad, dtype=bool)
    i = int(np.flatnonzero(bad)[0])
    where = f"{path}, row {df.index[i] + 1}"
    id_code = df["id_code"].iloc[i] if "id_code" in df.columns else None
    if isinstance(id_code, str) and id_code:
        where += f" (id_code {id_code})"
    more = int(bad.sum()) - 1
    return MetadataError(f"{where}: {problem}" + (f"; {hint}" if hint else "")
                         + (f" ({more} more row(s) like it)" if more else ""))
