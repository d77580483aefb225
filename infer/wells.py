"""The well tables inference works on: the test wells in the source's order, and wells
parsed from id_codes. Below predict and ensemble alike (both need the test-well order)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from infer import InferError
from shards.layout import cell_type_of, parse_id_code
from shards.metadata import source_test_ids


def load_test_wells(data_dir) -> pd.DataFrame:
    """Test treatment wells (id_code, experiment, cell_type, plate, well) in the order the
    data directory lists them: test.csv's rows, or the release metadata.csv's (either
    layout, validated by shards.metadata); the order of every prediction file."""
    return wells_from_ids(source_test_ids(data_dir))


def wells_from_ids(ids: Sequence[str]) -> pd.DataFrame:
    """experiment, cell_type, plate, well parsed from id_codes (for logits of any split)."""
    rows = []
    for i in ids:
        try:
            e, p, w = parse_id_code(i)
            rows.append((i, e, cell_type_of(e), p, w))
        except ValueError as err:
            raise InferError(str(err)) from None
    return pd.DataFrame(rows, columns=["id_code", "experiment", "cell_type", "plate", "well"])


def experiments_of(ids: Sequence[str], source: str) -> list[str]:
    """The experiment of each id_code (via parse_id_code); `source` names the file in errors."""
    out = []
    for i in ids:
        try:
            out.append(parse_id_code(i)[0])
        except ValueError as err:
            raise InferError(f"{source}: {err}") from None
    return out


def int_column(df: pd.DataFrame, path: str, column: str, low: int | None = None,
               high: int | None = None) -> np.ndarray:
    """`column` of a CSV read as text (read_csv_checked) as int64; the first bad row is named."""
    values = pd.to_numeric(df[column], errors="coerce")
    bad = values.isna() | (values != values.round())
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise InferError(f"{path}, row {i + 1} (id_code {df['id_code'].iloc[i]}): {column} "
                         f"{df[column].iloc[i]!r} is not an integer")
    values = values.astype(np.int64)
    out = np.zeros(len(values), bool)
    if low is not None:
        out |= (values < low).to_numpy()
    if high is not None:
        out |= (values > high).to_numpy()
    if out.any():
        i = int(np.flatnonzero(out)[0])
        want = f"{low}..{high}" if low is not None and high is not None else \
            (f">= {low}" if low is not None else f"<= {high}")
        raise InferError(f"{path}, row {i + 1} (id_code {df['id_code'].iloc[i]}): {column} "
                         f"{values.iloc[i]} out of range (need {want})"
                         + (f" ({int(out.sum()) - 1} more row(s) like it)" if out.sum() > 1 else ""))
    return values.to_numpy()
