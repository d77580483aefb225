"""K folds by experiment: `OUT/train_k.csv` and `OUT/valid_k.csv`, as the reference's csv/ folder.

A validation fold holds whole experiments, because wells of one experiment share
plate effects that would leak between train and valid.  Within each cell type
the experiments are shuffled with `seed` and dealt round-robin, and the deal
continues across cell types, so every fold sees several cell types and fold
sizes differ by at most one experiment.
"""
from __future__ import annotations

import os
import re

import numpy as np
import pandas as pd

from common.errors import BadInput, refuse_to_replace
from shards.atomic import write_atomic
from shards.metadata import load_wells

_FOLD_FILE = re.compile(r"^(train|valid)_\d+\.csv$")
FOLD_COLUMNS = ("id_code", "experiment", "plate", "well", "sirna", "experiment_type", "dataset")


def assign_folds(experiments_by_cell_type: dict[str, list[str]], n_folds: int,
                 seed: int = 0) -> dict[str, int]:
    """Experiment -> fold, dealing each cell type's shuffled experiments round-robin."""
    rng = np.random.default_rng(seed)
    fold_of, dealt = {}, 0
    for cell_type in sorted(experiments_by_cell_type):
        exps = sorted(experiments_by_cell_type[cell_type])
        for e in (exps[i] for i in rng.permutation(len(exps))):
            fold_of[e] = dealt % n_folds
            dealt += 1
    return fold_of


def write_folds(data_dir, n_folds=5, out_dir="csv", seed=0, overwrite=False) -> list[str]:
    """Write train_k.csv / valid_k.csv for k in 0..n_folds-1 from the train treatment
    wells of DATA (either layout; one row per well); return the written paths.

    Fold files already there must be exactly these (a re-run), else it refuses unless
    `overwrite`; then the old scheme's fold files are all replaced (never a mix of two)."""
    if os.path.exists(str(out_dir)) and not os.path.isdir(str(out_dir)):
        raise BadInput(f"{out_dir}: output directory (--out-dir) is a file, not a directory")
    wells = load_wells(data_dir)
    train = wells[(wells["split"] == "train") & (wells["well_type"] == "treatment")]
    rows = pd.DataFrame({
        "id_code": train["id_code"], "experiment": train["experiment"],
        "plate": train["plate"], "well": train["well"], "sirna": train["sirna"],
        "experiment_type": train["cell_type"], "dataset": "train",
    }, columns=list(FOLD_COLUMNS)).reset_index(drop=True)

    by_cell_type = rows.groupby("experiment_type")["experiment"].unique()
    n_experiments = int(sum(len(v) for v in by_cell_type))
    if isinstance(n_folds, bool) or not isinstance(n_folds, (int, np.integer)) \
            or not 2 <= n_folds <= n_experiments:
        raise BadInput(f"n_folds={n_folds!r}: need an integer from 2 to the number of train "
                       f"experiments with treatment wells in {data_dir} ({n_experiments}), "
                       "since each valid fold holds whole experiments")
    fold_of = assign_folds({ct: list(v) for ct, v in by_cell_type.items()}, n_folds, seed)
    fold = rows["experiment"].map(fold_of).to_numpy()

    files = {}
    for k in range(n_folds):
        in_valid = fold == k
        files[f"train_{k}.csv"] = rows[~in_valid]
        files[f"valid_{k}.csv"] = rows[in_valid]
    old = _fold_files(str(out_dir))
    if old and not overwrite and not _same_files(str(out_dir), old, files):
        refuse_to_replace([os.path.join(str(out_dir), n) for n in sorted(old)],
                          f"another fold scheme than these {n_folds} folds")
    os.makedirs(out_dir, exist_ok=True)
    paths = [_write_csv_atomic(df, os.path.join(str(out_dir), n)) for n, df in files.items()]
    for name in sorted(set(old) - set(files)):
        os.remove(os.path.join(str(out_dir), name))
    for k in range(n_folds):
        in_valid = fold == k
        valid_exps = sorted(rows.loc[in_valid, "experiment"].unique())
        print(f"fold {k}: valid {len(valid_exps)} experiments ({', '.join(valid_exps)}), "
              f"{int(in_valid.sum())} valid / {int((~in_valid).sum())} train wells")
    return paths


def _fold_files(out_dir: str) -> list[str]:
    if not os.path.isdir(out_dir):
        return []
    return [n for n in os.listdir(out_dir) if _FOLD_FILE.match(n)]


def _same_files(out_dir: str, old: list[str], files: dict) -> bool:
    """Whether the fold files there are byte for byte the ones about to be written."""
    if set(old) != set(files):
        return False
    for name, df in files.items():
        with open(os.path.join(out_dir, name), "rb") as f:
            if f.read() != df.to_csv(index=False).encode():
                return False
    return True


def _write_csv_atomic(df: pd.DataFrame, path: str) -> str:
    # A killed run must never leave a half-written fold that a trainer would read.
    return write_atomic(path, lambda tmp: df.to_csv(tmp, index=False))
