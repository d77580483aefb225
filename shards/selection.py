"""Turn a selection of wells into the rows each epoch reads, with their labels.

A selection names wells (`id_code`), never sites: the site mode decides which of
a well's two sites an epoch reads.  Everything here is numpy on the sites
table; no pixels are touched.

    wells = resolve_selection(sites, "valid_0.csv", label_column="sirna")
    table = well_sites(sites, wells)                 # (n_wells, 2) rows of site 1 and 2
    rows = epoch_rows(table, wells, "random", 1, seed, epoch)
    where = locate_rows(sites, shard_paths, index_paths)
    order = epoch_order(rows, where["shard"], where["position"], shuffle, seed, epoch)
    mine, batches = rank_batches(order, rank, world_size, batch_size, drop_last)

`locate_rows` says where each row lives in the tar shards, from their DALI
index files (`ext offset size name` per member, one line per sample).
"""
from __future__ import annotations

import os

import numpy as np
import pandas as pd

from shards.dali_index import PIXELS, READ_MEMBERS, format_entry, parse_index
from shards.layout import SITES, SPLITS, sample_key
from shards.loader_spec import DEFAULT_LABEL_COLUMN, LoaderError
from shards.metadata import read_csv_checked
from shards.store import StoreError


def resolve_selection(sites: pd.DataFrame, selection, label_column=DEFAULT_LABEL_COLUMN
                      ) -> pd.DataFrame:
    """Wells of `selection` as a DataFrame (`id_code`, `label`), in the selection's order.

    `selection` is a DataFrame or CSV path with an `id_code` column, a split name
    ("train" / "test"), or "all".  Labels come from the selection's
    `label_column`; missing values become -1.  A selection without the column
    gets -1 everywhere when the column is the default (`sirna`: e.g. test.csv,
    which has no labels); any other absent column is an error, since asking
    for it by name means the caller expects labels.  For a split name or "all"
    the labels are the sites table's `label_column`.  Bad input raises
    LoaderError (MetadataError for an unreadable CSV) naming the file and row.
    """
    if isinstance(selection, (str, os.PathLike)) and str(selection) in (*SPLITS, "all"):
        name = str(selection)
        if label_column is not None and label_column not in sites.columns:
            raise LoaderError(f"label column {label_column!r} is not a column of the sites "
                              f"table ({', '.join(sites.columns)})")
        chosen = sites if name == "all" else sites[sites["split"] == name]
        df = chosen.drop_duplicates("id_code")
        if df.empty:
            raise LoaderError(f"selection {name!r} is empty: the store holds no {name} wells")
        labels = (df[label_column] if label_column is not None
                  else pd.Series(-1, index=df.index))
        return _frame(df["id_code"], labels, lambda i: f"the sites table's {label_column!r}")

    where = "selection"
    if isinstance(selection, (str, os.PathLike)):
        where = str(selection)
        if not os.path.isfile(where):
            raise LoaderError(f"selection {where!r} is neither a CSV file nor one of "
                              f"{', '.join(SPLITS)}, all")
        # Names the file on an empty or unreadable CSV, a missing id_code column or
        # an empty id_code cell; reads every value as text.
        selection = read_csv_checked(where, ["id_code"])
        where_row = where + ", row"
    else:
        where_row = "selection row"
    if not isinstance(selection, pd.DataFrame):
        raise LoaderError(f"selection must be a DataFrame, a CSV path, a split name or 'all', "
                          f"not {type(selection).__name__}")
    if "id_code" not in selection.columns:
        raise LoaderError(f"{where}: no id_code column (columns: "
                          f"{', '.join(map(str, selection.columns))})")
    if selection.empty:
        raise LoaderError(f"{where}: the selection is empty (no wells)")
    selection = selection.reset_index(drop=True)  # position i is data row i + 1
    ids = selection["id_code"].astype(str).str.strip()
    dup = ids[ids.duplicated()]
    if len(dup):
        raise LoaderError(f"{where_row} {dup.index[0] + 1}: id_code {dup.iloc[0]!r} appears "
                          f"more than once ({len(dup)} repeated); a selection names each well "
                          "once")
    unknown = ~ids.isin(sites["id_code"])
    if unknown.any():
        bad = ids[unknown]
        raise LoaderError(f"{where_row} {bad.index[0] + 1}: id_code {bad.iloc[0]!r} is not in "
                          f"the store" + (f", nor are {unknown.sum() - 1} more"
                                          if unknown.sum() > 1 else ""))
    if label_column is None:
        labels = pd.Series(-1, index=selection.index)
    elif label_column in selection.columns:
        labels = selection[label_column]
    elif label_column == DEFAULT_LABEL_COLUMN:
        labels = pd.Series(-1, index=selection.index)
    else:
        raise LoaderError(f"{where}: label column {label_column!r} missing (columns: "
                          f"{', '.join(map(str, selection.columns))})")
    return _frame(ids, labels, lambda i: f"{where_row} {i + 1}: column {label_column!r}")


def _frame(ids: pd.Series, labels: pd.Series, where) -> pd.DataFrame:
    """(id_code, label int64) with missing labels (NaN or blank) as -1; LoaderError naming
    the first non-integer one where `where(i)` says (i: its 0-based position)."""
    text = labels.astype(str).str.strip()
    missing = labels.isna().to_numpy() | (text == "").to_numpy()
    values = pd.to_numeric(text.where(~missing), errors="coerce")
    bad = ~missing & (values.isna() | (values.fillna(0) % 1 != 0)).to_numpy()
    if bad.any():
        i = int(bad.argmax())
        raise LoaderError(f"{where(i)}: label {labels.iloc[i]!r} of id_code "
                          f"{ids.iloc[i]!r} is not an integer")
    return pd.DataFrame({"id_code": ids.to_numpy(),
                         "label": values.fillna(-1).astype(np.int64).to_numpy()})


def well_sites(sites: pd.DataFrame, wells: pd.DataFrame) -> np.ndarray:
    """(n_wells, 2) int64: the rows of site 1 and site 2 of each well, -1 where absent."""
    table = np.full((len(wells), len(SITES)), -1, np.int64)
    pos = pd.Index(wells["id_code"])
    where = pos.get_indexer(sites["id_code"])
    hit = where >= 0
    site = sites["site"].to_numpy()[hit]
    table[where[hit], site - 1] = sites["row"].to_numpy()[hit]
    return table


def epoch_rows(table: np.ndarray, wells: pd.DataFrame, sites_mode: str, site: int,
               seed: int, epoch: int) -> np.ndarray:
    """Rows read in `epoch`, one per well (random, one) or two per well (two).

    `random` draws a site per well from (seed, epoch) alone, so every rank
    draws the same sites; a well with one site only always gives that one.
    """
    if sites_mode == "two":
        rows = table.reshape(-1)
        return rows[rows >= 0]
    if sites_mode == "one":
        rows = table[:, site - 1]
        missing = np.flatnonzero(rows < 0)
        if len(missing):
            raise LoaderError(f"id_code {wells['id_code'].iloc[missing[0]]!r} has no site {site} "
                              f"in the store ({len(missing)} wells lack it); use sites='random'")
        return rows
    pick = np.random.default_rng([seed, epoch, 1]).integers(0, 2, len(table))
    rows = table[np.arange(len(table)), pick]
    return np.where(rows >= 0, rows, table[np.arange(len(table)), 1 - pick])


def epoch_order(rows: np.ndarray, shard_of_row: np.ndarray, position_of_row: np.ndarray,
                shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    """The epoch's reading order, grouped by shard.

    DALI reads its (filtered) index files one shard after another, so the
    order is shards in a random order, each in a random order of its samples.
    Shards are written as a shuffled mix of wells, so a run of samples of one
    shard already mixes experiments and plates.  Without shuffle: storage order.
    """
    if not shuffle:
        return rows[np.lexsort((position_of_row[rows], shard_of_row[rows]))]
    rng = np.random.default_rng([seed, epoch, 2])
    rows = rows[rng.permutation(len(rows))]
    shard_rank = rng.permutation(int(shard_of_row.max()) + 1)
    return rows[np.argsort(shard_rank[shard_of_row[rows]], kind="stable")]


def rank_batches(order: np.ndarray, rank: int, world_size: int, batch_size: int,
                 drop_last: bool) -> tuple[np.ndarray, list[list[int]]]:
    """This rank's rows (in order) and its batch sizes, grouped per reader batch.

    Ranks take every world_size-th sample, so they are disjoint and each keeps
    the shard grouping.  Every rank gets the same number of batches: with
    drop_last the tail that does not fill a batch on every rank is dropped;
    without it each sample is read exactly once, and a rank whose share falls
    one batch short splits its last full batch in two.  The result is a list
    with, per reader batch of `batch_size` (the last one partial), the sizes
    of the batches cut from it.
    """
    n = len(order)
    if drop_last:
        per_rank = n // (world_size * batch_size)
        if per_rank == 0:
            raise LoaderError(f"{n} samples do not fill one batch of {batch_size} on each of "
                             f"{world_size} rank(s); use drop_last=False or a smaller batch")
        order = order[: per_rank * world_size * batch_size]
    mine = order[rank::world_size]
    n_batches = -(-(-(-n // world_size)) // batch_size)  # ceil(ceil(n / W) / B)
    if drop_last:
        n_batches = per_rank
    if len(mine) < n_batches:
        raise LoaderError(f"rank {rank} has {len(mine)} samples for {n_batches} batches: "
                         f"{n} samples cannot give {world_size} ranks the same number of "
                         f"batches of {batch_size} without repeats; use drop_last=True")
    pieces = [[batch_size]] * (len(mine) // batch_size)
    if len(mine) % batch_size:
        pieces.append([len(mine) % batch_size])
    if len(pieces) < n_batches:  # one short, so len(mine) % batch_size == 0: halve the last
        b = pieces[-1][0]
        pieces[-1] = [b - b // 2, b // 2]
    return mine, pieces


def locate_rows(sites: pd.DataFrame, shard_paths: list[str], index_paths: list[str]) -> dict:
    """Where each row of the sites table sits in the shards, from their DALI index files.

    Returns arrays indexed by row: `shard` (position in `shard_paths`, -1 if in
    no shard), `position` (sample number in its shard), `offset` and `size` of
    its `.pixels` member; and `lines`: per shard, per sample, the index line
    reduced to the `pixels` and `row` members (what a filtered index lists).
    The sample key `<id_code>_s<site>` gives the row; the tar's `.row` member,
    which the DALI reader returns, must agree (the tests check it does).
    """
    n = len(sites)
    key_to_row = {sample_key(i, s): r
                  for i, s, r in zip(sites["id_code"], sites["site"], sites["row"])}
    out = {"shard": np.full(n, -1, np.int64), "position": np.zeros(n, np.int64),
           "offset": np.zeros(n, np.int64), "size": np.zeros(n, np.int64), "lines": []}
    for s, path in enumerate(index_paths):
        with open(path) as f:
            try:
                entries = parse_index(f.read())
            except ValueError as e:
                raise StoreError(f"{path}: not a DALI index: {e}; re-run prep") from None
        lines = []
        for i, entry in enumerate(entries):
            members = {ext: (ext, off, size, name) for ext, off, size, name in entry}
            if any(ext not in members for ext in READ_MEMBERS):
                raise StoreError(f"{path}: sample {i + 1} lacks a {' or '.join(READ_MEMBERS)} "
                                 f"member ({entry!r})")
            key = members[PIXELS][3].rsplit(".", 1)[0]
            row = key_to_row.get(key)
            if row is None:
                raise StoreError(f"{path}: sample {key!r} is not in the sites table")
            if out["shard"][row] >= 0:
                raise StoreError(f"{path}: sample {key!r} (row {row}) is also in "
                                 f"{index_paths[out['shard'][row]]}")
            out["shard"][row], out["position"][row] = s, i
            out["offset"][row] = members[PIXELS][1]
            out["size"][row] = members[PIXELS][2]
            lines.append(format_entry([members[ext] for ext in READ_MEMBERS]))
        out["lines"].append(lines)
    return out


def shard_damage(rows: np.ndarray, where: dict, shard_paths: list[str]) -> str | None:
    """Why reading `rows` from their shards fails, if the shards changed since `locate_rows`:
    the first row (in `rows`' order) whose shard is gone or now ends before one of its
    members does, as one line naming the shard and the sample; None if every sample is
    still within its file (the failure is something else).  Called only after a read
    failed, so it may stat every shard."""
    sizes = {}
    for row in rows:
        s = int(where["shard"][row])
        path = shard_paths[s]
        if s not in sizes:
            sizes[s] = os.path.getsize(path) if os.path.isfile(path) else None
        line = where["lines"][s][where["position"][row]]
        f = line.split()
        key = f[3].rsplit(".", 1)[0]
        end = max(int(f[i + 1]) + int(f[i + 2]) for i in range(0, len(f), 4))
        if sizes[s] is None:
            return (f"{path}: shard missing since the store was opened (sample {key}, row "
                    f"{row}); re-run prep shards")
        if end > sizes[s]:
            return (f"{path}: sample {key} (row {row}) ends at byte {end} but the shard now has "
                    f"{sizes[s]} bytes: truncated since the store was opened; re-run prep "
                    "shards")
    return None
