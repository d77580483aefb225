"""Which wells each part trains and validates on, their labels, and the loaders over them.

Selections are well-level (`id_code`, `experiment`, `label`); `shards.make_loader`
expands them to sites.  Labels are 0-based class indices of the part's head:
control = sirna - 1108 (31 classes), finetune/pseudo = sirna (with
`controls_as_classes`, the plus recipe's 1139 classes, control wells join the
training selection with their sirna 1108..1138 as label).

Control validation (a choice the reference leaves open): the control wells of
the experiments in `valid_csv` (by default fold 0's valid experiments) are
held out, so the control model is scored on experiments it never saw — the
situation of the test set.  With `control_holdout: false` they are trained on
as well (all controls of train and test, as the reference did) and the
validation score is then optimistic.  Held-out controls are never
treatment wells, so no fold of Parts II/III gains label information from them.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

import shards
from common.distributed import Dist
from shards.layout import CONTROL_BASE, N_CONTROLS, N_TREATMENTS, parse_id_code
from shards.metadata import read_csv_checked
from train.config import RunConfig
from train.config_schema import ConfigError
from train.techniques.zoom import zoom_params


def selections(cfg: RunConfig, sites: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, valid) well selections with columns id_code, experiment, label."""
    if cfg.part == "control":
        return control_selections(cfg, sites)
    return csv_selections(cfg, sites)


def per_rank_batch(batch_size: int, d: Dist, key: str) -> int:
    """`batch_size` is global (the reference's 64 was one DataParallel batch): each of
    the world_size ranks takes an equal share, so the optimizer steps per epoch and
    the samples per step do not depend on how many processes run."""
    if batch_size % d.world_size:
        raise ConfigError(f"{key} {batch_size} is the global batch and must divide by the "
                          f"{d.world_size} processes (torchrun --nproc_per_node); e.g. "
                          f"{max(1, batch_size // d.world_size) * d.world_size}")
    return batch_size // d.world_size


def make_loaders(cfg: RunConfig, d: Dist, device, train_sel, valid_sel):
    """The training and validation loaders of this rank (the one place train builds them)."""
    return (make_loader(cfg, d, device, train_sel),
            make_loader(cfg, d, device, valid_sel, evaluate=True))


def make_loader(cfg: RunConfig, d: Dist, device, selection, evaluate: bool = False):
    """A training loader over `selection`, or with `evaluate` one that reads both sites of
    every well in storage order without augmentation (validation, progressive labels)."""
    dp = cfg.stages.data_params
    zoom = zoom_params(dp.to_dict()["zoom"]) or (0.0, 1.0)
    spec = shards.LoaderSpec(
        channels=cfg.channels, norm=dp.norm, sites=dp.sites, site=dp.site,
        image_size=dp.image_size, batch_size=per_rank_batch(dp.batch_size, d,
                                                            "stages.data_params.batch_size"),
        augment=dp.augment, channel_dropout=dp.channel_dropout, shear_deg=dp.shear_deg,
        shear_p=dp.shear_p, zoom_p=zoom[0], zoom_min_side=zoom[1], shuffle=True,
        seed=cfg.args.seed, rank=d.rank,
        world_size=d.world_size, backend=dp.backend, device=str(device),
        num_workers=dp.num_workers, drop_last=dp.drop_last, label_column="label")
    if evaluate:
        spec = dataclasses.replace(
            spec, sites="two", augment=False, channel_dropout=0.0, shear_p=0.0, zoom_p=0.0,
            shuffle=False,
            drop_last=False,
            batch_size=-(-(dp.valid_batch_size or dp.batch_size) // d.world_size))
    return shards.make_loader(dp.shards, selection, spec)


def _wells(sites: pd.DataFrame) -> pd.DataFrame:
    return sites.drop_duplicates("id_code")[["id_code", "split", "experiment", "plate", "well",
                                             "sirna", "well_type"]].reset_index(drop=True)


def _row(path: str, df: pd.DataFrame, i: int) -> str:
    return f"{path}, row {df.index[i] + 1} (id_code {df['id_code'].iloc[i]})"


def _experiments(df: pd.DataFrame, path: str) -> pd.Series:
    """The experiment of every row: its own column, or parsed from the id_code."""
    if "experiment" in df.columns:
        return df["experiment"]
    out = []
    for i, code in enumerate(df["id_code"]):
        try:
            out.append(parse_id_code(code)[0])
        except ValueError as e:
            raise ConfigError(f"{_row(path, df, i)}: {e}") from None
    return pd.Series(out, index=df.index)


def _sirnas(df: pd.DataFrame, path: str) -> np.ndarray:
    """The sirna column as integers; a row that is not one names itself."""
    values = pd.to_numeric(df["sirna"], errors="coerce")
    bad = values.isna() | (values != values.round())
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise ConfigError(f"{_row(path, df, i)}: sirna {df['sirna'].iloc[i]!r} is not an integer")
    return values.to_numpy().astype(np.int64)


def control_selections(cfg: RunConfig, sites: pd.DataFrame):
    dp = cfg.stages.data_params
    wells = _wells(sites)
    wells = wells[wells["well_type"] != "treatment"].copy()
    bad = wells[(wells["sirna"] < CONTROL_BASE) | (wells["sirna"] >= CONTROL_BASE + N_CONTROLS)]
    if len(bad):
        raise ConfigError(f"{dp.shards}: control wells with sirna outside {CONTROL_BASE}.."
                          f"{CONTROL_BASE + N_CONTROLS - 1}: "
                          f"{bad[['id_code', 'sirna']].head().to_dict('records')}")
    wells["label"] = (wells["sirna"] - CONTROL_BASE).astype("int64")
    held = read_csv_checked(dp.valid_csv, ("id_code",))
    experiments = set(_experiments(held, dp.valid_csv))
    is_valid = wells["experiment"].isin(experiments)
    valid = wells[is_valid]
    train = wells[~is_valid] if dp.control_holdout else wells
    if valid.empty:
        raise ConfigError(f"no control wells in the experiments of {dp.valid_csv} "
                          f"({sorted(experiments)[:5]}...); is the store {dp.shards} built from "
                          "the same data?")
    if train.empty:
        raise ConfigError(f"no control wells left to train on: every experiment of {dp.shards} "
                          f"is in {dp.valid_csv}; set control_holdout: false or use another fold")
    cols = ["id_code", "experiment", "label"]
    return train[cols].reset_index(drop=True), valid[cols].reset_index(drop=True)


def csv_selections(cfg: RunConfig, sites: pd.DataFrame):
    dp = cfg.stages.data_params
    known = set(sites["id_code"])
    out = []
    for path in (dp.train_csv, dp.valid_csv):
        df = read_csv_checked(path, ("id_code", "sirna"))
        dup = df["id_code"].duplicated()
        if dup.any():
            raise ConfigError(f"{_row(path, df, int(np.flatnonzero(dup.to_numpy())[0]))}: "
                              "id_code repeated; each well once")
        sirna = _sirnas(df, path)
        # Treatments are classes 0..1107; control wells (if the fold CSVs carry them) are
        # not among the classes of Parts II/III and are passed over.  Anything else is a
        # mistake in the CSV, never silently dropped.
        wrong = (sirna < 0) | (sirna >= CONTROL_BASE + N_CONTROLS)
        if wrong.any():
            i = int(np.flatnonzero(wrong)[0])
            raise ConfigError(f"{_row(path, df, i)}: sirna {sirna[i]} is neither a treatment "
                              f"(0..{N_TREATMENTS - 1}) nor a control ({CONTROL_BASE}.."
                              f"{CONTROL_BASE + N_CONTROLS - 1})")
        df = df[sirna < CONTROL_BASE].copy()
        df["label"] = sirna[sirna < CONTROL_BASE]
        unknown = ~df["id_code"].isin(known)
        if unknown.any():
            i = int(np.flatnonzero(unknown.to_numpy())[0])
            raise ConfigError(f"{_row(path, df, i)}: id_code not in the store {dp.shards} "
                              f"({int(unknown.sum())} such rows); was the CSV made from the "
                              "same data?")
        if df.empty:
            raise ConfigError(f"{path} selects no treatment wells")
        df["experiment"] = _experiments(df, path)
        out.append(df[["id_code", "experiment", "label"]].reset_index(drop=True))
    if dp.controls_as_classes:   # validation stays treatment wells only
        out[0] = pd.concat([out[0], control_class_wells(cfg, sites, set(out[0]["experiment"]))],
                           ignore_index=True)
    return out[0], out[1]


def control_class_wells(cfg: RunConfig, sites: pd.DataFrame, experiments: set) -> pd.DataFrame:
    """The plus recipe's controls as classes: the control wells of the training
    experiments and of every test experiment (test_controls.csv's labels are public, and
    the store keeps them), labelled with their sirna id (classes 1108..1138)."""
    wells = _wells(sites)
    wells = wells[(wells["well_type"] != "treatment")
                  & (wells["experiment"].isin(experiments) | (wells["split"] == "test"))].copy()
    bad = wells[(wells["sirna"] < CONTROL_BASE) | (wells["sirna"] >= CONTROL_BASE + N_CONTROLS)]
    if len(bad):
        raise ConfigError(f"{cfg.stages.data_params.shards}: control wells with sirna outside "
                          f"{CONTROL_BASE}..{CONTROL_BASE + N_CONTROLS - 1} "
                          f"({bad[['id_code', 'sirna']].head(3).to_dict('records')}); "
                          "stages.data_params.controls_as_classes needs their labels")
    wells["label"] = wells["sirna"].astype("int64")
    return wells[["id_code", "experiment", "label"]].reset_index(drop=True)


def steps_in(loader, d: Dist, device) -> int:
    """Batches every rank can take (the minimum), so no rank waits in an all-reduce forever."""
    n = len(loader)
    if d.enabled:
        import torch
        import torch.distributed as torch_dist
        t = torch.tensor([n], device=device if device.type == "cuda" else "cpu")
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MIN)
        n = int(t.item())
    return n
