"""Per-well logits from per-site logits: the one place that averages sites into wells.

Validation (train) and prediction (infer) both read sites in batches, possibly
on several ranks, possibly with repeats (a padded last batch); both want the
mean logit per well over its sites (and TTA views, already averaged per site).
"""
from __future__ import annotations

import numpy as np


class WellMeans:
    """Running per-well sums of site logits; each site row counts once.

    `well_of_row[r]` is the well index (0..n_wells-1) of sites-table row r, or
    -1 for a row outside the selection (an error if it is ever added)."""

    def __init__(self, well_of_row: np.ndarray, n_wells: int):
        self.well_of_row = np.asarray(well_of_row, dtype=np.int64)
        self.n_wells = int(n_wells)
        self.sums: np.ndarray | None = None
        self.counts = np.zeros(self.n_wells, np.float64)
        self._seen = np.zeros(len(self.well_of_row), bool)

    def add(self, rows, logits) -> None:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        logits = np.asarray(logits, dtype=np.float64)
        first = np.zeros(len(rows), bool)
        first[np.unique(rows, return_index=True)[1]] = True
        keep = first & ~self._seen[rows]
        if not keep.any():
            return
        self._seen[rows[keep]] = True
        wells = self.well_of_row[rows[keep]]
        if (wells < 0).any():
            raise RuntimeError("the loader yielded sites outside the selected wells")
        if self.sums is None:
            self.sums = np.zeros((self.n_wells, logits.shape[1]), np.float64)
        np.add.at(self.sums, wells, logits[keep])
        np.add.at(self.counts, wells, 1.0)

    def all_reduce(self, device) -> None:
        """Sum over the ranks of a torch.distributed group (each rank saw other sites)."""
        import torch
        import torch.distributed as dist
        comm = device if device.type == "cuda" else torch.device("cpu")
        c = torch.tensor([0 if self.sums is None else self.sums.shape[1]], device=comm)
        dist.all_reduce(c, op=dist.ReduceOp.MAX)  # a rank may have seen no batch
        if self.sums is None:
            self.sums = np.zeros((self.n_wells, int(c.item())), np.float64)
        t_sums = torch.from_numpy(self.sums).to(comm)
        t_counts = torch.from_numpy(self.counts).to(comm)
        dist.all_reduce(t_sums)
        dist.all_reduce(t_counts)
        self.sums, self.counts = t_sums.cpu().numpy(), t_counts.cpu().numpy()

    def means(self) -> np.ndarray:
        """(n_wells, C) float32; a well with no site stays 0 (check `counts`)."""
        if self.sums is None:
            raise RuntimeError("no site logits were added (the loader yielded no samples)")
        return (self.sums / np.maximum(self.counts, 1)[:, None]).astype(np.float32)


def well_index(sites_id_code: np.ndarray, well_ids) -> np.ndarray:
    """Per sites-table row, the position of its id_code in `well_ids` (-1 if absent)."""
    import pandas as pd
    pos = pd.Series(np.arange(len(well_ids)), index=pd.Index(well_ids))
    return pos.reindex(np.asarray(sites_id_code)).fillna(-1).to_numpy().astype(np.int64)


def per_row(sites, values) -> np.ndarray:
    """`values` (one per sites-table line) indexed by the row number a loader yields: the
    table's `row` column where it has one, else the line's position; -1 for a row not listed."""
    values = np.asarray(values, dtype=np.int64)
    if "row" not in sites.columns:
        return values
    rows = sites["row"].to_numpy().astype(np.int64)
    out = np.full(int(rows.max()) + 1 if len(rows) else 0, -1, np.int64)
    out[rows] = values
    return out


def well_of_row(sites, wells) -> np.ndarray:
    """Per row number a loader over `sites` yields, the index of its well in `wells` (-1
    outside them): what `WellMeans` averages into."""
    return per_row(sites, well_index(sites["id_code"].to_numpy(), wells["id_code"].to_numpy()))
