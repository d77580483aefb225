"""Progressive pseudo labels inside a run (the 1st place's scheme), as pure functions.

From a set epoch on, the run labels some test wells with its own predictions
and trains on them with the train wells.  Each test plate holds its siRNA
group once (shards.plate_groups), so labelling is done per plate, greedily:

1. a well's probabilities are restricted to its plate's group (renormalized
   there): a label never leaves the plate's group;
2. its margin is the best minus the second-best probability among the group's
   siRNAs not yet given to a well of this plate;
3. the well with the largest margin is labelled with its best siRNA, which is
   then taken away from the plate's other wells (a siRNA is never given twice
   on one plate); their margins are updated, and so on,

until the plate's quota (`share` of its wells) is met or the best margin falls
below `min_margin`.  `labelled_share(epoch, ...)` makes the share grow from
`start_share` at `start_epoch` to every well at `full_epoch`.  The labels are
recomputed from the newest predictions each time (nothing is frozen), so an
early mistake can be undone.  This stands beside the one-shot Part III
(infer pseudo-labels), not instead of it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from shards.plate_groups import Groups, infer_plate_groups
from train.config_schema import ConfigError

WHERE = "stages.data_params.progressive_pseudo"


@dataclass(frozen=True)
class ProgressiveSchedule:
    """When and how much: labels from `start_epoch` (0-based, of the stage), `start_share` of
    each plate's wells then, growing linearly to all of them at `full_epoch`."""
    start_epoch: int = 5
    full_epoch: int = 20
    start_share: float = 0.2
    min_margin: float = 0.0

    @classmethod
    def from_params(cls, params) -> "ProgressiveSchedule | None":
        """The config's entry: null/false = off, true = the defaults, or a mapping."""
        if params is None or params is False:
            return None
        if params is True:
            params = {}
        if not isinstance(params, dict):
            raise ConfigError(f"{WHERE} {params!r}: null/false (off), true or a mapping of "
                              f"{sorted(cls.__dataclass_fields__)}")
        unknown = set(params) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"{WHERE}: unknown key(s) {sorted(unknown)}; valid: "
                              f"{sorted(cls.__dataclass_fields__)}")
        for k, v in params.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"{WHERE}.{k} {v!r}: need a number")
        s = cls(**params)
        if int(s.start_epoch) != s.start_epoch or int(s.full_epoch) != s.full_epoch \
                or s.start_epoch < 0 or s.full_epoch < s.start_epoch:
            raise ConfigError(f"{WHERE}: start_epoch {s.start_epoch} and full_epoch "
                              f"{s.full_epoch} must be integers, 0 <= start_epoch <= full_epoch")
        if not 0 < s.start_share <= 1 or s.min_margin < 0:
            raise ConfigError(f"{WHERE}: start_share must be in (0, 1] and min_margin >= 0")
        return s

    def share(self, epoch: int) -> float:
        return labelled_share(epoch, self.start_epoch, self.full_epoch, self.start_share)


def labelled_share(epoch: int, start_epoch: int, full_epoch: int, start_share: float) -> float:
    """0 before start_epoch; start_share at start_epoch, rising linearly to 1 at full_epoch."""
    if epoch < start_epoch:
        return 0.0
    if epoch >= full_epoch:
        return 1.0
    return start_share + (1.0 - start_share) * (epoch - start_epoch) / (full_epoch - start_epoch)


def _top2(p: np.ndarray, rows: np.ndarray, avail: np.ndarray):
    """Best and second column among the available ones, and their values, for `rows`
    (second = -1 and value 0 when one siRNA is left: nothing to confuse it with)."""
    q = np.where(avail[None, :], p[rows], -1.0)
    at = np.arange(len(rows))
    best = q.argmax(axis=1)
    v1 = q[at, best]
    q[at, best] = -1.0
    second = q.argmax(axis=1)
    v2 = q[at, second]
    second = np.where(v2 < 0, -1, second)
    return best, second, v1, np.maximum(v2, 0.0)


def plate_labels(probs: np.ndarray, members: np.ndarray, share: float,
                 min_margin: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy labels of one plate's wells: (row, sirna, margin) arrays in labelling order.

    probs: (n_wells, n_classes) of the plate's wells; members: the plate group's siRNAs."""
    members = np.asarray(members, dtype=np.int64)
    n, k = len(probs), len(members)
    quota = min(n, k, int(math.floor(share * n + 1e-9)))
    if quota == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0)
    p = np.asarray(probs, dtype=np.float64)[:, members]
    p = p / np.maximum(p.sum(axis=1, keepdims=True), 1e-30)
    avail = np.ones(k, bool)
    open_ = np.ones(n, bool)
    all_rows = np.arange(n)
    best, second, v1, v2 = _top2(p, all_rows, avail)
    out_row, out_col, out_margin = [], [], []
    while len(out_row) < quota:
        margin = np.where(open_, v1 - v2, -np.inf)
        r = int(margin.argmax())
        if margin[r] < min_margin:
            break
        c = int(best[r])
        out_row.append(r)
        out_col.append(c)
        out_margin.append(float(margin[r]))
        open_[r] = False
        avail[c] = False
        # Only the wells whose best or runner-up was c see their margin change.
        stale = all_rows[open_ & ((best == c) | (second == c))]
        if len(stale):
            best[stale], second[stale], v1[stale], v2[stale] = _top2(p, stale, avail)
    return (np.asarray(out_row, np.int64), members[np.asarray(out_col, np.int64)],
            np.asarray(out_margin))


def progressive_labels(probs: np.ndarray, wells: pd.DataFrame, groups: Groups, share: float,
                       min_margin: float = 0.0, plates: pd.DataFrame | None = None
                       ) -> pd.DataFrame:
    """Labels for `share` of each test plate's wells.

    probs: (n_wells, n_classes >= the groups' largest siRNA + 1), softmax of the run's
    per-well logits (1139 columns are fine: only the group's columns are read);
    wells: rows aligned with probs, columns experiment, plate (and id_code, carried over);
    plates: a table of shards.plate_groups.infer_plate_groups (made from probs when None).
    Returns one row per labelled well: well (row of `wells`), [id_code], experiment,
    plate, sirna, margin; in plate order, each plate's wells in labelling order.
    """
    probs = np.asarray(probs)
    if plates is None:
        plates = infer_plate_groups(probs, wells, groups)
    group_of = {(r.experiment, int(r.plate)): int(r.group) for r in plates.itertuples(index=False)}
    keys = wells[["experiment", "plate"]].reset_index(drop=True)
    parts = []
    for (exp, plate), idx in keys.groupby(["experiment", "plate"], sort=True).groups.items():
        idx = np.asarray(idx)
        members = groups.members[group_of[(exp, int(plate))]]
        rows, sirnas, margins = plate_labels(probs[idx], members, share, min_margin)
        parts.append(pd.DataFrame({"well": idx[rows], "experiment": exp, "plate": int(plate),
                                   "sirna": sirnas, "margin": margins}))
    out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        columns=["well", "experiment", "plate", "sirna", "margin"])
    if "id_code" in wells.columns:
        out.insert(1, "id_code", wells["id_code"].to_numpy()[out["well"].to_numpy(np.int64)])
    return out
