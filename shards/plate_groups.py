"""siRNA plate groups, derived from the train labels, and each plate's group from predictions.

In RxRx1 the 1108 treatment siRNAs fall into 4 groups of 277, and every plate
holds exactly one group.  Nothing here knows those numbers: two siRNAs are in
one group when some train plate holds both, so the groups are the connected
components of "shares a train plate" (synthetic presets have fewer, smaller
groups).  A test plate's group is then the one that carries most of the
predicted probability mass of the plate's wells.  When the train plates of an
experiment always hold distinct groups (true in RxRx1: an experiment holds
every siRNA once), the test plates of an experiment are matched to groups
one-to-one, which settles a plate whose own scores are close.

A data fact that both the ensemble (infer) and in-run pseudo-labelling (train)
need, so it lives with the store's other data modules.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from common.errors import BadInput
from shards.layout import CONTROL_BASE
from shards.metadata import load_wells
from shards.source_layout import wells_file


class GroupError(BadInput):
    """Labels or predictions from which no plate group can be had; names the file or plate."""


# Below this mean mass no group explains a plate's predictions at all.
MIN_GROUP_MASS = 1e-3


@dataclass(frozen=True)
class Groups:
    """The partition of the treatment siRNAs seen in train into plate groups."""
    members: tuple            # tuple of sorted int64 arrays, one per group
    plate_numbers: frozenset  # plate numbers seen in train (1..4 in RxRx1)
    distinct_per_experiment: bool  # no train experiment repeats a group on two plates
    train_plates: pd.DataFrame     # experiment, plate, group, wells: one row per train plate

    @property
    def n_groups(self) -> int:
        return len(self.members)

    @property
    def sizes(self) -> list[int]:
        return [len(m) for m in self.members]

    @property
    def max_sirna(self) -> int:
        return int(max(int(m[-1]) for m in self.members))

    def group_of(self) -> dict[int, int]:
        return {int(s): g for g, m in enumerate(self.members) for s in m}

    def describe(self) -> str:
        sizes = self.sizes
        same = len(set(sizes)) == 1
        size_txt = f"{sizes[0]} siRNAs each" if same else f"sizes {sizes}"
        return (f"{self.n_groups} siRNA groups ({size_txt}) from {len(self.train_plates)} train "
                f"plates; plates of an experiment hold distinct groups: "
                f"{'yes' if self.distinct_per_experiment else 'no'}")


def derive_groups(labelled: pd.DataFrame, source: str = "train.csv") -> Groups:
    """Groups from labelled treatment wells (columns experiment, plate, sirna).

    Control siRNAs (>= CONTROL_BASE) sit on every plate and are ignored.
    """
    missing = [c for c in ("experiment", "plate", "sirna") if c not in labelled.columns]
    if missing:
        raise GroupError(f"{source}: missing column(s) {', '.join(missing)} needed to derive "
                         "the siRNA plate groups")
    df = labelled[["experiment", "plate", "sirna"]].copy()
    df["sirna"] = df["sirna"].astype(np.int64)
    df["plate"] = df["plate"].astype(np.int64)
    df = df[(df["sirna"] >= 0) & (df["sirna"] < CONTROL_BASE)]
    if df.empty:
        raise GroupError(f"{source}: no labelled treatment wells (sirna 0..{CONTROL_BASE - 1}); "
                         "cannot derive the siRNA plate groups")

    sirnas, node = np.unique(df["sirna"].to_numpy(), return_inverse=True)
    plate_id = df.groupby(["experiment", "plate"], sort=True).ngroup().to_numpy()
    # Link every well's siRNA to the first siRNA of its plate: a star per plate.
    first_node = pd.Series(node).groupby(plate_id).transform("first").to_numpy()
    n = len(sirnas)
    graph = coo_matrix((np.ones(len(node)), (node, first_node)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)

    # Number groups by their smallest siRNA so that the numbering is reproducible.
    order = {c: g for g, c in enumerate(pd.unique(comp[np.argsort(sirnas, kind="stable")]))}
    comp = np.array([order[c] for c in comp])
    members = tuple(np.sort(sirnas[comp == g]).astype(np.int64) for g in range(len(order)))

    df["group"] = comp[node]
    plates = (df.groupby(["experiment", "plate"], sort=True)
              .agg(group=("group", "first"), wells=("sirna", "size")).reset_index())
    per_exp = plates.groupby("experiment")["group"].agg(lambda g: g.nunique() == len(g))
    return Groups(members=members,
                  plate_numbers=frozenset(int(p) for p in plates["plate"].unique()),
                  distinct_per_experiment=bool(per_exp.all()),
                  train_plates=plates)


def group_scores(probs: np.ndarray, groups: Groups) -> np.ndarray:
    """(n_wells, n_groups): each well's probability mass on each group's siRNAs."""
    check_columns(probs, groups)
    return np.stack([probs[:, m].sum(axis=1) for m in groups.members], axis=1)


def check_columns(probs: np.ndarray, groups: Groups, source: str = "the predictions") -> None:
    if probs.ndim != 2 or probs.shape[1] <= groups.max_sirna:
        raise GroupError(f"{source}: shape {tuple(probs.shape)} has too few class columns; the "
                         f"siRNA groups reach sirna {groups.max_sirna}, so at least "
                         f"{groups.max_sirna + 1} columns are needed")


def infer_plate_groups(probs: np.ndarray, wells: pd.DataFrame, groups: Groups,
                       min_margin: float = 0.05, use_experiment: bool = True) -> pd.DataFrame:
    """The group of every plate in `wells` (columns experiment, plate; rows align with probs).

    Returns one row per plate: experiment, plate, wells, group, group_size,
    score (the chosen group's mean share of the mass on groups), runner_up,
    margin (score minus the best other group's; negative when the experiment
    constraint overrode the plate's own favourite), ambiguous (margin <
    min_margin), constrained, missing_wells.
    """
    check_columns(probs, groups)
    if len(probs) != len(wells):
        raise GroupError(f"the predictions have {len(probs)} rows but there are {len(wells)} wells")
    mass = group_scores(probs, groups)
    keys = wells[["experiment", "plate"]].reset_index(drop=True)
    plate_idx = keys.groupby(["experiment", "plate"], sort=True).ngroup().to_numpy()
    table = keys.groupby(["experiment", "plate"], sort=True).size().rename("wells").reset_index()

    unknown = sorted(set(table["plate"].astype(int)) - groups.plate_numbers)
    if groups.plate_numbers and unknown:
        bad = table[table["plate"].isin(unknown)].iloc[0]
        raise GroupError(f"plate {bad['experiment']}_{bad['plate']}: plate number {bad['plate']} "
                         f"has no train counterpart (train has plates "
                         f"{sorted(groups.plate_numbers)}), so no siRNA group is known for it")

    n_plates = len(table)
    n_wells = table["wells"].to_numpy()
    # Score = the group's share of the mass that falls on any group, averaged
    # over the plate's wells: scale-free, so classes outside every group (a
    # synthetic preset's unused outputs, controls) do not shrink the margins.
    total = mass.sum(axis=1)
    share = mass / np.maximum(total, 1e-30)[:, None]
    scores = np.zeros((n_plates, groups.n_groups))
    np.add.at(scores, plate_idx, share)
    scores /= n_wells[:, None]
    plate_total = np.bincount(plate_idx, weights=total, minlength=n_plates) / n_wells
    sizes = np.array(groups.sizes)
    fits = n_wells[:, None] <= sizes[None, :]
    for i in range(n_plates):
        name = f"{table.at[i, 'experiment']}_{table.at[i, 'plate']}"
        if not fits[i].any():
            raise GroupError(f"plate {name}: {table.at[i, 'wells']} wells but the largest siRNA "
                             f"group holds {sizes.max()} siRNAs; no group covers this plate "
                             "(wells from another layout, or duplicated wells?)")
        if plate_total[i] < MIN_GROUP_MASS:
            raise GroupError(f"plate {name}: the predictions put almost no probability on any "
                             f"siRNA group (mean mass {plate_total[i]:.2e}); no group covers "
                             "this plate's predictions (are these control-model logits?)")
    usable = np.where(fits, scores, -np.inf)

    chosen = usable.argmax(axis=1)
    constrained = np.zeros(n_plates, bool)
    if use_experiment and groups.distinct_per_experiment:
        for _, idx in table.groupby("experiment").groups.items():
            idx = np.asarray(idx)
            if len(idx) > groups.n_groups:
                continue  # more plates than groups: the constraint cannot hold, keep argmax
            cost = np.where(fits[idx], -scores[idx], 1e9)
            rows, cols = linear_sum_assignment(cost)
            if (cost[rows, cols] >= 1e9).any():
                continue
            constrained[idx[rows]] = chosen[idx[rows]] != cols
            chosen[idx[rows]] = cols

    others = usable.copy()
    others[np.arange(n_plates), chosen] = -np.inf
    best_other = others.max(axis=1)
    chosen_score = scores[np.arange(n_plates), chosen]
    # With a single usable group there is nothing to confuse it with.
    margin = chosen_score - np.where(np.isfinite(best_other), best_other, 0.0)
    runner_up = np.where(np.isfinite(best_other), others.argmax(axis=1), -1)
    table["group"] = chosen
    table["group_size"] = sizes[chosen]
    table["score"] = chosen_score
    table["runner_up"] = runner_up
    table["margin"] = margin
    table["ambiguous"] = margin < float(min_margin)
    table["constrained"] = constrained
    table["missing_wells"] = table["group_size"] - table["wells"]
    return table


def load_train_groups(data_dir) -> Groups:
    """The groups of the labelled train treatment wells of a data directory (either layout)."""
    wells = load_wells(data_dir)
    train = wells[(wells["split"] == "train") & (wells["well_type"] == "treatment")]
    return derive_groups(train, source=wells_file(data_dir, "train"))
