"""The test labels `score` compares against, from whichever file holds them.

Two sources, told apart by their columns rather than their names:
- rxrx.ai's release `metadata.csv`, whose test labels are public (one label per
  well from its two site rows, read and validated by shards.metadata);
- an `id_code,sirna` file: `test_truth.csv` of the synthetic data, or any table
  of test labels in that form.
A data directory stands for the file in it (metadata.csv, else test_truth.csv);
the Kaggle competition layout has no test labels at all.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from infer import InferError
from infer.wells import int_column
from shards.layout import CONTROL_BASE, RELEASE_CSV
from shards.metadata import read_csv_checked, read_test_labels

TRUTH_CSV = "test_truth.csv"  # the synthetic data's test labels (either layout's synth has them)
# The release's columns that an id_code,sirna table never has.
_RELEASE_MARKS = ("site_id", "well_id", "sirna_id")


@dataclass(frozen=True)
class Truth:
    labels: pd.DataFrame  # id_code, sirna (int, 0..1107): one row per test treatment well
    path: str             # the file read, for messages


def read_labels(path: str, what: str) -> pd.DataFrame:
    """id_code,sirna of a submission or truth file: treatment siRNAs 0..1107, one row per well."""
    df = read_csv_checked(path, ("id_code", "sirna"))
    if df.empty:
        raise InferError(f"{path}: the {what} has a header but no rows; expected one row "
                         "id_code,sirna per test well")
    dup = df["id_code"].duplicated()
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        raise InferError(f"{path}, row {i + 1}: id_code {df['id_code'].iloc[i]} appears more "
                         "than once")
    # Test wells are treatment wells: a control class or an unknown number is no answer.
    return pd.DataFrame({"id_code": df["id_code"].to_numpy(),
                         "sirna": int_column(df, path, "sirna", 0, CONTROL_BASE - 1)})


def read_truth(truth) -> Truth:
    """The labels of `truth`: a release metadata.csv, an id_code,sirna CSV, or a data
    directory holding one of them; InferError/MetadataError (one line) otherwise."""
    path = _truth_file(str(truth))
    if _is_release_metadata(path):
        labels = read_test_labels(path)
        return Truth(labels[["id_code", "sirna"]].reset_index(drop=True), path)
    return Truth(read_labels(path, "truth file"), path)


def _truth_file(truth: str) -> str:
    if os.path.isdir(truth):
        for name in (RELEASE_CSV, TRUTH_CSV):
            if os.path.isfile(os.path.join(truth, name)):
                return os.path.join(truth, name)
        raise InferError(f"{truth}: no test labels here; looked for {RELEASE_CSV} (the rxrx.ai "
                         f"release, whose test labels are public) and {TRUTH_CSV} (synthetic "
                         "data); the Kaggle competition files hold none")
    if not os.path.isfile(truth):
        raise InferError(f"{truth}: truth file not found (--truth: the release's {RELEASE_CSV}, "
                         f"an id_code,sirna CSV such as {TRUTH_CSV}, or a directory holding one)")
    return truth


def _is_release_metadata(path: str) -> bool:
    """Whether this is the release's metadata (by name, or any of its own columns: a
    damaged one is then named by the release's reader), not an id_code,sirna table."""
    if os.path.basename(path) == RELEASE_CSV:
        return True
    try:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError):
        return False  # read_csv_checked names the problem
    header = {h.strip() for h in header}
    return any(c in header for c in _RELEASE_MARKS)
