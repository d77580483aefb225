"""Progressive pseudo labels inside a run, as the 1st place's code ran them (pure functions).

main.py:294-405 of maciej-sypetkowski/kaggle-rcic-1st (`pseudo_label`), before each
epoch from `--pl-epoch` on:
1. every test well not yet labelled is predicted (its sites' logits combined);
2. its logits are restricted to its plate's siRNA group, from a fixed plate -> group
   table (precomputed.py's `group_assignment`), and the siRNAs already labelled on that
   plate are masked out;
3. its label is the best remaining siRNA, its confidence the best minus the second-best
   *logit* (not probability);
4. the wells are ranked by confidence **globally**, across plates, and the first n are
   taken, n = round(f(x) * N) minus the wells labelled before, with f(x) = a x + b
   (`--pl-size-func 0.6*x+0.4`), x = (epoch - pl_epoch + 1) / (epochs - pl_epoch + 1)
   and N all test wells;
5. a taken well whose siRNA was already given on its plate in this round is skipped
   (not replaced: fewer than n are added);
6. labels are **frozen**: a labelled well is never predicted or relabelled again.

What differs here, and why: only test wells are labelled (the 1st place also labelled
its validation fold, which would make validation scores meaningless); the plate -> group
table is read from a file (`plate_groups`, e.g. an ensemble's plates CSV) or inferred
once from the run's own predictions when labelling starts and then kept (the 1st
place's table came from its own earlier models' predictions); HUVEC-18's leak is not
used.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import pandas as pd

from shards.plate_groups import Groups
from train.config_schema import ConfigError

WHERE = "stages.data_params.progressive_pseudo"
MASKED = -1e7          # main.py:343 sets masked logits to -10e6


@dataclass(frozen=True)
class PseudoSchedule:
    """When and how many: from `start_epoch` (0-based, of the last stage) on, a share
    a * x + b of the test wells (`size`: [a, b]); `grow_epoch`: the epoch grows by the
    labelled wells (the 1st place; needs the Cosine schedule, which follows the fractional
    epoch) or keeps the base selection's length (a one-cycle schedule's length is fixed);
    `plate_groups`: a CSV with experiment, plate, group (null: inferred once)."""
    start_epoch: int = 1
    size: tuple = (0.6, 0.4)
    grow_epoch: bool = False
    plate_groups: str | None = None

    @classmethod
    def from_params(cls, params) -> "PseudoSchedule | None":
        """The config's entry: null/false = off, true = the defaults, or a mapping."""
        if params is None or params is False:
            return None
        if params is True:
            params = {}
        names = sorted(f.name for f in fields(cls))
        if not isinstance(params, dict):
            raise ConfigError(f"{WHERE} {params!r}: null/false (off), true or a mapping of {names}")
        unknown = set(params) - set(names)
        if unknown:
            raise ConfigError(f"{WHERE}: unknown key(s) {sorted(unknown)}; valid: {names}")
        p = dict(params)
        start = p.get("start_epoch", cls.start_epoch)
        if isinstance(start, bool) or not isinstance(start, int) or start < 1:
            raise ConfigError(f"{WHERE}.start_epoch {start!r}: an integer >= 1 (labels come "
                              "from the model of the epoch before)")
        size = p.get("size", list(cls.size))
        if not (isinstance(size, (list, tuple)) and len(size) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in size)
                and 0 <= size[1] <= 1 and 0 <= size[0] + size[1] <= 1):
            raise ConfigError(f"{WHERE}.size {size!r}: [a, b] of the share a*x + b, with "
                              "b and a + b in [0, 1]")
        grow = p.get("grow_epoch", cls.grow_epoch)
        if not isinstance(grow, bool):
            raise ConfigError(f"{WHERE}.grow_epoch {grow!r}: true or false")
        groups = p.get("plate_groups")
        if groups is not None and not (isinstance(groups, str) and groups):
            raise ConfigError(f"{WHERE}.plate_groups {groups!r}: null or a CSV path")
        return cls(start, (float(size[0]), float(size[1])), grow, groups)

    def quota(self, epoch: int, n_epochs: int, n_wells: int) -> int:
        """Wells labelled in all by the start of `epoch` (0-based, of the stage): 0 before
        start_epoch (main.py:356-359)."""
        if epoch < self.start_epoch:
            return 0
        x = (epoch - self.start_epoch + 1) / (n_epochs - self.start_epoch + 1)
        return int(round((self.size[0] * x + self.size[1]) * n_wells))


def select_labels(logits: np.ndarray, wells: pd.DataFrame, group_of_plate: dict,
                  groups: Groups, taken: pd.DataFrame, n: int) -> pd.DataFrame:
    """New labels for (at most) n of the unlabelled `wells` (steps 2-5 above).

    logits: (len(wells), >= 1108) per-well logits; wells: experiment, plate (and id_code);
    group_of_plate: (experiment, plate) -> group index into groups.members; taken: the
    labels given before (experiment, plate, label).  Returns rows of `wells` (column
    `well`: the position) with experiment, plate, sirna, margin, in ranking order."""
    logits = np.asarray(logits, dtype=np.float64)
    keys = list(zip(wells["experiment"], wells["plate"].astype(int)))
    given: dict = {}
    for e, p, s in zip(taken["experiment"], taken["plate"].astype(int), taken["label"]):
        given.setdefault((e, p), set()).add(int(s))
    best = np.empty(len(wells), np.int64)
    margin = np.empty(len(wells))
    for i, key in enumerate(keys):
        row = np.full(logits.shape[1], MASKED)
        allowed = np.asarray(groups.members[group_of_plate[key]], dtype=np.int64)
        row[allowed] = logits[i, allowed]
        row[list(given.get(key, ()))] = MASKED
        best[i] = int(row.argmax())
        top2 = np.partition(row, -2)[-2:]
        margin[i] = top2[1] - top2[0]
    order = np.argsort(-margin, kind="stable")[:max(n, 0)]
    added: dict = {}
    out = []
    for i in order:
        if best[i] in added.setdefault(keys[i], set()):
            continue                       # main.py:382-384: skipped, not replaced
        added[keys[i]].add(int(best[i]))
        out.append((int(i), keys[i][0], keys[i][1], int(best[i]), float(margin[i])))
    table = pd.DataFrame(out, columns=["well", "experiment", "plate", "sirna", "margin"])
    if "id_code" in wells.columns:
        table.insert(1, "id_code", wells["id_code"].to_numpy()[table["well"].to_numpy(np.int64)])
    return table


def read_plate_groups(path: str, groups: Groups) -> dict:
    """(experiment, plate) -> group from a CSV with columns experiment, plate, group (an
    ensemble's plates CSV has them)."""
    from shards.metadata import read_csv_checked
    df = read_csv_checked(path, ("experiment", "plate", "group"))
    bad = ~df["group"].isin(range(len(groups.members)))
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise ConfigError(f"{path}, row {i + 2}: group {df['group'].iloc[i]!r} is not one of "
                          f"0..{len(groups.members) - 1}")
    return {(e, int(p)): int(g) for e, p, g in zip(df["experiment"], df["plate"], df["group"])}

