"""Which wells each part trains and validates on, and their labels.

Returns well-level selections (`id_code`, `experiment`, `label`) that
`shards.make_loader` expands to sites.  Labels are 0-based class indices of
the part's head: control = sirna - 1108 (31 classes), finetune/pseudo = sirna.

Control validation (a choice the reference leaves open): the control wells of
the experiments in `valid_csv` (by default fold 0's valid experiments) are
held out, so the control model is scored on experiments it never saw — the
situation of the test set.  With `control_holdout: false` they are trained on
as well (all controls of train and test, as the reference did) and the
validation score is then optimistic.  Held-out controls are never
treatment wells, so no fold of Parts II/III gains label information from them.
"""
from __future__ import annotations

import os

import pandas as pd

from shards.layout import CONTROL_BASE, N_CONTROLS, N_TREATMENTS

from train.config import Config


def read_csv(path: str, what: str, required=("id_code",)) -> pd.DataFrame:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    df = pd.read_csv(path)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"{what} {path} lacks column(s) {missing}; it has {list(df.columns)}")
    dup = df["id_code"][df["id_code"].duplicated()]
    if len(dup):
        raise ValueError(f"{what} {path} repeats id_code(s) {list(dup[:5])}")
    return df


def selections(cfg: Config, sites: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, valid) well selections with columns id_code, experiment, label."""
    if cfg.part == "control":
        return control_selections(cfg, sites)
    return csv_selections(cfg, sites)


def _wells(sites: pd.DataFrame) -> pd.DataFrame:
    return sites.drop_duplicates("id_code")[["id_code", "split", "experiment", "plate", "well",
                                             "sirna", "well_type"]].reset_index(drop=True)


def control_selections(cfg: Config, sites: pd.DataFrame):
    dp = cfg.stages.data_params
    wells = _wells(sites)
    wells = wells[wells["well_type"] != "treatment"].copy()
    bad = wells[(wells["sirna"] < CONTROL_BASE) | (wells["sirna"] >= CONTROL_BASE + N_CONTROLS)]
    if len(bad):
        raise ValueError(f"control wells with sirna outside {CONTROL_BASE}..{CONTROL_BASE + N_CONTROLS - 1}: "
                         f"{bad[['id_code', 'sirna']].head().to_dict('records')}")
    wells["label"] = (wells["sirna"] - CONTROL_BASE).astype("int64")
    held = read_csv(dp.valid_csv, "control validation experiments: valid CSV",
                    required=("id_code",))
    experiments = set(held["experiment"] if "experiment" in held.columns
                      else held["id_code"].str.split("_").str[0])
    is_valid = wells["experiment"].isin(experiments)
    valid = wells[is_valid]
    train = wells[~is_valid] if dp.control_holdout else wells
    if valid.empty:
        raise ValueError(f"no control wells in the experiments of {dp.valid_csv} "
                         f"({sorted(experiments)[:5]}...) — is the store built from the same data?")
    if train.empty:
        raise ValueError("no control wells left to train on")
    cols = ["id_code", "experiment", "label"]
    return train[cols].reset_index(drop=True), valid[cols].reset_index(drop=True)


def csv_selections(cfg: Config, sites: pd.DataFrame):
    dp = cfg.stages.data_params
    known = set(sites["id_code"])
    out = []
    for path, what in ((dp.train_csv, "train CSV"), (dp.valid_csv, "valid CSV")):
        df = read_csv(path, what, required=("id_code", "sirna"))
        if df["sirna"].isna().any():
            raise ValueError(f"{what} {path}: sirna missing in rows "
                             f"{list(df.index[df['sirna'].isna()][:5])}")
        sirna = df["sirna"].astype("int64")
        # Control wells (if the fold CSVs carry them) are not among the 1108 classes.
        df = df[sirna < CONTROL_BASE].copy()
        bad = df[df["sirna"] < 0]
        if len(bad):
            raise ValueError(f"{what} {path}: sirna must be 0..{N_TREATMENTS - 1}; rows "
                             f"{bad[['id_code', 'sirna']].head().to_dict('records')}")
        unknown = df.loc[~df["id_code"].isin(known), "id_code"]
        if len(unknown):
            raise ValueError(f"{what} {path}: {len(unknown)} id_code(s) are not in the store "
                             f"{dp.shards}, e.g. {list(unknown[:5])}")
        if df.empty:
            raise ValueError(f"{what} {path} selects no treatment wells")
        df["label"] = df["sirna"].astype("int64")
        if "experiment" not in df.columns:
            df["experiment"] = df["id_code"].str.split("_").str[0]
        out.append(df[["id_code", "experiment", "label"]].reset_index(drop=True))
    return out[0], out[1]
