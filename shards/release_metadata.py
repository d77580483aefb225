"""Read and validate rxrx.ai's `metadata.csv` (the release layout) into one row per well.

The release lists every **site** (`site_id,well_id,cell_type,dataset,experiment,
plate,well,site,well_type,sirna,sirna_id`); `sirna` is the ThermoFisher name,
`sirna_id` the integer class. Class mapping: the store's label is `sirna_id`
as it stands, which is the Kaggle competition's numbering, and that is checked
rather than assumed: a treatment well's `sirna_id` must lie in 0..1107 and a
control's (positive or negative) in 1108..1138, one `sirna_id` per `sirna` and
one `sirna` per `sirna_id`. Anything else is a MetadataError naming the file,
the row and its site_id.

The release makes the test labels public; `read_release_wells` returns them,
and shards.metadata decides what of them reaches the store (nothing: the
store is the same from either layout, see docs/format.md).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from shards.csv_checks import (check_experiments, check_int_column, check_unique, raise_if,
                               read_csv_checked)
from shards.layout import (CONTROL_BASE, N_SIRNAS, N_TREATMENTS, PLATES, RELEASE_COLUMNS, SITES,
                           SPLITS, WELL_TYPES, WELLS, cell_type_of)

# What one well's two site rows must agree on (experiment, plate and well follow
# from well_id, which is checked against them row by row).
WELL_FIELDS = ("dataset", "cell_type", "well_type", "sirna", "sirna_id")
MAPPING = (f"class ids are the release's sirna_id: treatments 0..{N_TREATMENTS - 1}, "
           f"controls {CONTROL_BASE}..{N_SIRNAS - 1}")


def read_release_wells(path: str) -> pd.DataFrame:
    """One row per well, in the order of the file's site-1 rows: id_code, split,
    experiment, plate (int), well, well_type, sirna (int, the class id, test wells
    included), sirna_name (the ThermoFisher id), `_file` and `_row` (the site-1 row)."""
    df = read_csv_checked(path, RELEASE_COLUMNS)
    df = df[list(RELEASE_COLUMNS)].copy()
    _check_rows(path, df)
    _check_wells(path, df)
    _check_sirnas(path, df)
    _check_agree(path, df, "experiment", ("dataset",),
                 "an experiment belongs to one split (dataset)")

    wells = df[df["site"] == 1]
    return pd.DataFrame({
        "id_code": wells["well_id"], "split": wells["dataset"],
        "experiment": wells["experiment"], "plate": wells["plate"], "well": wells["well"],
        "well_type": wells["well_type"], "sirna": wells["sirna_id"],
        "sirna_name": wells["sirna"], "_file": path, "_row": wells.index + 1,
    }).reset_index(drop=True)


def _check_rows(path: str, df: pd.DataFrame) -> None:
    """Each row on its own: values, types, and ids that agree with their columns."""
    raise_if(path, df, ~df["dataset"].isin(SPLITS),
             lambda r: f"dataset {r['dataset']!r} is not one of {', '.join(SPLITS)}")
    check_experiments(path, df)
    cell_type = df["experiment"].map({e: cell_type_of(e) for e in df["experiment"].unique()})
    raise_if(path, df, df["cell_type"] != cell_type,
             lambda r: f"cell_type {r['cell_type']!r} disagrees with experiment "
                       f"{r['experiment']} (cell type {cell_type_of(r['experiment'])})")
    # Compared as text: the ids spell plate and site as bare digits.
    raise_if(path, df, ~df["plate"].isin([str(p) for p in PLATES]),
             lambda r: f"plate {r['plate']!r} is not one of {', '.join(map(str, PLATES))}")
    raise_if(path, df, ~df["well"].isin(WELLS),
             lambda r: f"well {r['well']!r} is not a usable well (rows B-O, columns 02-23, "
                       "e.g. B02)")
    raise_if(path, df, ~df["site"].isin([str(s) for s in SITES]),
             lambda r: f"site {r['site']!r} is not one of {', '.join(map(str, SITES))}")
    raise_if(path, df, ~df["well_type"].isin(WELL_TYPES),
             lambda r: f"well_type {r['well_type']!r} is not one of {', '.join(WELL_TYPES)}")
    check_int_column(path, df, "sirna_id", 0, N_SIRNAS - 1, f" ({MAPPING})")
    treatment = df["well_type"] == "treatment"
    raise_if(path, df, treatment & (df["sirna_id"] >= CONTROL_BASE),
             lambda r: f"sirna_id {r['sirna_id']} of a treatment well is outside "
                       f"0..{N_TREATMENTS - 1} ({MAPPING})")
    raise_if(path, df, ~treatment & (df["sirna_id"] < CONTROL_BASE),
             lambda r: f"sirna_id {r['sirna_id']} of a {r['well_type']} well is outside "
                       f"{CONTROL_BASE}..{N_SIRNAS - 1} ({MAPPING})")

    well_id = df["experiment"] + "_" + df["plate"] + "_" + df["well"]
    raise_if(path, df, df["well_id"] != well_id,
             lambda r: f"well_id {r['well_id']!r} disagrees with its columns experiment="
                       f"{r['experiment']}, plate={r['plate']}, well={r['well']} (expected "
                       f"{r['experiment']}_{r['plate']}_{r['well']}); fix whichever is wrong")
    raise_if(path, df, df["site_id"] != df["well_id"] + "_" + df["site"],
             lambda r: f"site_id {r['site_id']!r} disagrees with well_id {r['well_id']} and "
                       f"site {r['site']} (expected {r['well_id']}_{r['site']})")
    for c in ("plate", "site"):
        df[c] = df[c].astype(np.int64)


def _check_wells(path: str, df: pd.DataFrame) -> None:
    """Each well once per site, both sites present, its rows agreeing but for the site."""
    check_unique(path, df, "site_id", "each site must be listed once; remove the extra row")
    _check_agree(path, df, "well_id", WELL_FIELDS,
                 "a well's rows may differ only in site and site_id")
    codes, uniques = pd.factorize(df["well_id"])
    n_sites = pd.Series(np.bincount(codes, minlength=len(uniques))[codes], index=df.index)
    raise_if(path, df, n_sites != len(SITES),
             lambda r: f"well {r['well_id']} has no site {3 - r['site']} row; every well "
                       f"needs both sites {' and '.join(map(str, SITES))}")


def _check_sirnas(path: str, df: pd.DataFrame) -> None:
    """sirna (the ThermoFisher name) and sirna_id name each other one to one."""
    _check_agree(path, df, "sirna", ("sirna_id",), "one sirna_id per sirna")
    _check_agree(path, df, "sirna_id", ("sirna",), "one sirna per sirna_id")


def _check_agree(path: str, df: pd.DataFrame, by: str, columns, rule: str) -> None:
    """Every row holds the `columns` values of the first row with its `by` value; else
    name the first row that differs and the row it differs from."""
    codes, uniques = pd.factorize(df[by])
    # Position of each group's first row: reversed assignment, so the first write wins.
    first = np.empty(len(uniques), np.int64)
    first[codes[::-1]] = np.arange(len(df))[::-1]
    first_pos = first[codes]
    for column in columns:
        values = df[column].to_numpy()
        bad = values != values[first_pos]
        if bad.any():
            j = first_pos[np.flatnonzero(bad)[0]]
            raise_if(path, df, pd.Series(bad, index=df.index),
                     lambda r: f"{column} {r[column]} of {by} {r[by]} disagrees with row "
                               f"{df.index[j] + 1} ({column} {values[j]}); {rule}")

