"""The per-plate report of inferred plate groups.

The groups themselves (derived from train.csv, each test plate's group from the
predictions) are a data fact that training needs too: `shards.plate_groups`.
Its names are re-exported here for infer's modules.
"""
from __future__ import annotations

import pandas as pd

from shards.plate_groups import (MIN_GROUP_MASS, GroupError, Groups,  # noqa: F401
                                 check_columns, derive_groups, group_scores,
                                 infer_plate_groups, load_train_groups)


def format_plate_table(table: pd.DataFrame) -> str:
    """The per-plate report: plate, group, score, margin, wells (of the group's size), flags."""
    lines = [f"{'plate':<16} {'group':>5} {'score':>6} {'margin':>7} {'wells':>9}  notes"]
    for r in table.itertuples(index=False):
        notes = []
        if r.ambiguous:
            notes.append(f"AMBIGUOUS (runner-up group {r.runner_up})")
        if r.constrained:
            notes.append("group set by the experiment's other plates")
        if r.missing_wells > 0:
            notes.append(f"{r.missing_wells} missing well(s)")
        lines.append(f"{r.experiment + '_' + str(r.plate):<16} {r.group:>5} {r.score:>6.3f} "
                     f"{r.margin:>7.3f} {str(r.wells) + '/' + str(r.group_size):>9}  "
                     + "; ".join(notes))
    return "\n".join(lines)
