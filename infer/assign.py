"""One-to-one assignment of a plate's wells to its group's siRNAs (Hungarian algorithm).

A plate holds each siRNA of its group once, so the labels of its wells are a
matching, not independent argmaxes: the matching that maximizes the summed
log-probability is the most likely labelling under independent per-well
predictions.  A plate with missing wells has fewer wells than siRNAs; the
rectangular problem leaves some siRNAs unused.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

from infer import InferError
from infer.groups import Groups


def assign_plate(logp: np.ndarray, members: np.ndarray, plate: str = "plate") -> np.ndarray:
    """siRNA of each row of `logp` (n_wells, n_classes), each of `members` used at most once."""
    members = np.asarray(members, dtype=np.int64)
    if len(logp) > len(members):
        raise InferError(f"plate {plate}: {len(logp)} wells but its group has only "
                         f"{len(members)} siRNAs; a one-to-one assignment is impossible")
    cost = -np.asarray(logp, dtype=np.float64)[:, members]
    # -inf log-probabilities (a hard zero) would make the cost matrix infeasible.
    cost = np.nan_to_num(cost, nan=1e6, posinf=1e6)
    rows, cols = linear_sum_assignment(cost)
    out = np.empty(len(logp), dtype=np.int64)
    out[rows] = members[cols]
    return out


def assign_plates(logp: np.ndarray, wells: pd.DataFrame, plate_table: pd.DataFrame,
                  groups: Groups) -> np.ndarray:
    """siRNA of every well (rows of `wells`, columns experiment, plate) given each plate's group."""
    if len(logp) != len(wells):
        raise InferError(f"the predictions have {len(logp)} rows but there are {len(wells)} wells")
    group = {(e, int(p)): int(g) for e, p, g in
             plate_table[["experiment", "plate", "group"]].itertuples(index=False)}
    out = np.full(len(wells), -1, dtype=np.int64)
    keys = wells[["experiment", "plate"]].reset_index(drop=True)
    for (exp, plate), idx in keys.groupby(["experiment", "plate"], sort=True).groups.items():
        key = (exp, int(plate))
        if key not in group:
            raise InferError(f"plate {exp}_{plate} is missing from the plate-group table")
        idx = np.asarray(idx)
        out[idx] = assign_plate(logp[idx], groups.members[group[key]], f"{exp}_{plate}")
    return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))
