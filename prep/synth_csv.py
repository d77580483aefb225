"""The metadata files of a synthetic set: the Kaggle CSVs or rxrx.ai's metadata.csv.

Both are written from one wells table (prep.synth.plate_layouts), so the two
layouts of one seed list the same wells with the same labels.
"""
from __future__ import annotations

import os

import numpy as np
import pandas as pd

from shards import layout
from shards.atomic import write_atomic

PIXEL_STATS_COLUMNS = ("id_code", "experiment", "plate", "well", "site", "channel",
                       "mean", "std", "median", "min", "max")


def write_csvs(out_dir, wells: pd.DataFrame, stats: list) -> None:
    """The five Kaggle CSVs, plus test_truth.csv (read only by `infer score`)."""
    cols = ["id_code", "experiment", "plate", "well"]
    treat = wells[wells.well_type == "treatment"]
    ctrl = wells[wells.well_type != "treatment"]
    tr, te = treat[treat.split == "train"], treat[treat.split == "test"]
    frames = {"train.csv": tr[cols + ["sirna"]], "test.csv": te[cols]}
    for split in layout.SPLITS:
        c = ctrl[ctrl.split == split]
        frames[f"{split}_controls.csv"] = c[cols + ["sirna", "well_type"]]
    frames["sample_submission.csv"] = pd.DataFrame({"id_code": te.id_code, "sirna": 0})
    frames["test_truth.csv"] = te[["id_code", "sirna"]]
    frames["pixel_stats.csv"] = _pixel_stats(stats)
    _write_frames(out_dir, frames)


def sirna_name(class_id: int) -> str:
    """The made-up ThermoFisher id of a synthetic siRNA (one per class id, and back)."""
    return f"s{20000 + int(class_id)}"


def write_release_csvs(out_dir, wells: pd.DataFrame, stats: list) -> None:
    """rxrx.ai's metadata.csv (one row per site, test labels public, rows in the order
    of the wells, so the test wells come in test.csv's order) and pixel_stats.csv."""
    sites = wells.loc[wells.index.repeat(len(layout.SITES))].reset_index(drop=True)
    sites["site"] = np.tile(np.asarray(layout.SITES), len(wells))
    meta = pd.DataFrame({
        "site_id": sites.id_code + "_" + sites.site.astype(str), "well_id": sites.id_code,
        "cell_type": sites.cell_type, "dataset": sites.split, "experiment": sites.experiment,
        "plate": sites.plate, "well": sites.well, "site": sites.site,
        "well_type": sites.well_type, "sirna": sites.sirna.map(sirna_name),
        "sirna_id": sites.sirna,
    }, columns=list(layout.RELEASE_COLUMNS))
    _write_frames(out_dir, {layout.RELEASE_CSV: meta, "pixel_stats.csv": _pixel_stats(stats)})


def write_relations(path, pairs: pd.DataFrame) -> None:
    """relations.csv (sirna_a, sirna_b, family; class ids), the same in both layouts: the
    pairs `infer map --relations` scores a map's recall on."""
    _write_frames(os.path.dirname(path), {os.path.basename(path): pairs})


def _pixel_stats(stats: list) -> pd.DataFrame:
    return pd.DataFrame(stats, columns=list(PIXEL_STATS_COLUMNS))


def _write_frames(out_dir, frames: dict) -> None:
    for name, df in frames.items():
        write_atomic(os.path.join(out_dir, name),
                     lambda tmp, df=df: df.to_csv(tmp, index=False, float_format="%.6g"))
