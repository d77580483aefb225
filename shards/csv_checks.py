"""Checked reading of metadata CSVs, and the one wording of a bad row.

`read_csv_checked` is the one reader of id_code CSVs (shards.metadata exports
it); the other functions are the vectorised checks both layouts' readers
share. A bad row is a `MetadataError` naming the file, the row (1-based data
row, the header not counted), its key (id_code, or site_id in metadata.csv)
and what is wrong; rows are visited one by one only to word the message for
the first bad one.
"""
from __future__ import annotations

import os
import re
from typing import Sequence

import numpy as np
import pandas as pd

from shards.layout import KAGGLE_CSVS, RELEASE_CSV, cell_type_of, parse_id_code
from shards.source_layout import LOOKED_FOR, MetadataError

ROW_KEYS = ("id_code", "site_id")
_BLANK = re.compile(r"\s")  # the column that names a row in a message, first present


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
        hint = (f"; the Kaggle layout needs all of {', '.join(KAGGLE_CSVS)} (see docs/data.md)"
                if name in KAGGLE_CSVS else f"; {LOOKED_FOR}" if name == RELEASE_CSV else "")
        raise MetadataError(f"{path}: file not found{hint}")
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
        col = df[c].fillna("").astype(str)
        df[c] = col.str.strip() if _has_edge_blanks(col) else col
    empty = (df[list(required_columns)] == "").to_numpy()
    bad = empty.any(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        cols = [c for c, e in zip(required_columns, empty[i]) if e]
        raise row_error(path, df, bad, f"empty value in column(s) {', '.join(cols)}",
                        "fill in the value or remove the row")
    return df


def _has_edge_blanks(col: pd.Series) -> bool:
    """Whether any value may start or end with a blank (it holds one at all): one scan
    of the joined column, since stripping every value of metadata.csv's 11 columns
    costs seconds and real values hold no blanks."""
    return _BLANK.search("".join(col.tolist())) is not None


def is_id_code(value: str) -> bool:
    try:
        experiment, _, well = parse_id_code(value)
    except ValueError:
        return False
    return bool(experiment) and bool(well)


def check_experiments(path: str, df: pd.DataFrame) -> None:
    """Every `experiment` is '<cell type>-<nn>'."""
    # Few distinct experiments, so parsing each name once is cheap.
    bad = []
    for e in df["experiment"].unique():
        try:
            cell_type_of(e)
        except ValueError:
            bad.append(e)
    raise_if(path, df, df["experiment"].isin(bad),
             lambda r: f"experiment {r['experiment']!r} is not '<cell type>-<nn>' "
                       "(e.g. HEPG2-01)")


def check_int_column(path: str, df: pd.DataFrame, column: str, lo: int, hi: int,
                     hint: str = "") -> None:
    """`column` holds integers in lo..hi (as text); converted to int64 in place."""
    is_int = df[column].str.fullmatch(r"\d{1,18}")  # 18 digits fit int64
    raise_if(path, df, ~is_int, lambda r: f"{column} {r[column]!r} is not an integer in {lo}..{hi}")
    df[column] = df[column].astype(np.int64)
    raise_if(path, df, (df[column] < lo) | (df[column] > hi),
             lambda r: f"{column} {r[column]} is outside {lo}..{hi}{hint}")


def check_unique(path: str, df: pd.DataFrame, column: str, what: str) -> None:
    """Each value of `column` appears once; else name every row it appears in."""
    dup = df[column].duplicated(keep=False)
    if dup.any():
        value = df.loc[dup, column].iloc[0]
        rows = (df.index[df[column] == value] + 1).tolist()
        raise MetadataError(f"{path}: {column} {value} appears in rows "
                            f"{', '.join(map(str, rows))}; {what}")


def raise_if(path: str, df: pd.DataFrame, bad: pd.Series, describe) -> None:
    """Raise for the first row where `bad` holds; `describe(row)` words the problem."""
    if bad.any():
        raise row_error(path, df, bad, describe(df[np.asarray(bad, dtype=bool)].iloc[0]))


def row_error(path: str, df: pd.DataFrame, bad, problem: str, hint: str = "") -> MetadataError:
    bad = np.asarray(bad, dtype=bool)
    i = int(np.flatnonzero(bad)[0])
    where = f"{path}, row {df.index[i] + 1}"
    key = next((k for k in ROW_KEYS if k in df.columns), None)
    value = df[key].iloc[i] if key else None
    if isinstance(value, str) and value:
        where += f" ({key} {value})"
    more = int(bad.sum()) - 1
    return MetadataError(f"{where}: {problem}" + (f"; {hint}" if hint else "")
                         + (f" ({more} more row(s) like it)" if more else ""))
