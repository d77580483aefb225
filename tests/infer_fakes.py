"""Small planted tables for the inference tests (a helper module, not a test file).

A fake RxRx1 layout: G groups of K treatment siRNAs, every experiment's four
plates hold the groups in a random order, one control per plate, and planted
logits whose signal strength sets how often the argmax is right.
"""
from __future__ import annotations

import os

import numpy as np
import pandas as pd

from shards.layout import NEGATIVE_CONTROL, WELLS, cell_type_of

TRAIN_EXPS = ("HEPG2-01", "HUVEC-01", "RPE-01", "U2OS-01")
TEST_EXPS = ("HEPG2-02", "HUVEC-02", "U2OS-02")
N_CLASSES = 1108


def make_dataset(root, group_size=12, n_groups=4, missing=(), seed=0, sample_order=None,
                 shuffle_test_csv=False, layout="kaggle"):
    """Write the four well CSVs, sample_submission.csv and test_truth.csv under `root`;
    with layout="release" the same wells as rxrx.ai's metadata.csv alone (two site rows a
    well, test labels public, the test wells in the same order as test.csv's would be).

    `missing`: id_codes of test treatment wells to leave out.  Returns a dict
    with groups (G, K), test (test wells with true sirna, test.csv order) and
    plate_group {(experiment, plate): group}.
    """
    rng = np.random.default_rng(seed)
    groups = rng.permutation(n_groups * group_size).reshape(n_groups, group_size)
    rows, plate_group = [], {}
    for split, exps in (("train", TRAIN_EXPS), ("test", TEST_EXPS)):
        for e in exps:
            order = rng.permutation(n_groups)
            for plate in (1, 2, 3, 4):
                g = int(order[(plate - 1) % n_groups])
                plate_group[(e, plate)] = g
                sirnas = list(rng.permutation(groups[g])) + [NEGATIVE_CONTROL]
                wells = sorted(rng.choice(len(WELLS), len(sirnas), replace=False))
                for s, w in zip(sirnas, wells):
                    rows.append((split, f"{e}_{plate}_{WELLS[w]}", e, plate, WELLS[w], int(s)))
    df = pd.DataFrame(rows, columns=["split", "id_code", "experiment", "plate", "well", "sirna"])
    df = df[~df["id_code"].isin(list(missing))]
    if shuffle_test_csv:  # test.csv need not be sorted; the logits follow its order
        is_test = (df["split"] == "test").to_numpy()
        df = pd.concat([df[~is_test], df[is_test].sample(frac=1, random_state=seed)])
    ctrl = df["sirna"] >= 1108
    cols = ["id_code", "experiment", "plate", "well"]
    os.makedirs(root, exist_ok=True)
    test = df[(df["split"] == "test") & ~ctrl].reset_index(drop=True)
    test = test.assign(cell_type=test["experiment"].map(cell_type_of))
    info = dict(groups=groups, test=test, plate_group=plate_group,
                train=df[(df["split"] == "train") & ~ctrl].reset_index(drop=True))
    if layout == "release":
        write_release_metadata(root, df)
        return info
    for split in ("train", "test"):
        part = df[(df["split"] == split) & ~ctrl]
        part[cols + (["sirna"] if split == "train" else [])].to_csv(
            os.path.join(root, f"{split}.csv"), index=False)
        c = df[(df["split"] == split) & ctrl].assign(well_type="negative_control")
        c[cols + ["sirna", "well_type"]].to_csv(os.path.join(root, f"{split}_controls.csv"),
                                               index=False)
    sample = test[["id_code"]].assign(sirna=0)
    if sample_order is not None:
        sample = sample.iloc[sample_order]
    sample.to_csv(os.path.join(root, "sample_submission.csv"), index=False)
    test[["id_code", "sirna"]].to_csv(os.path.join(root, "test_truth.csv"), index=False)
    return info


def write_release_metadata(root, wells: pd.DataFrame) -> None:
    """metadata.csv of the release layout for `wells` (split, id_code, experiment, plate,
    well, sirna), rows in the wells' order, site 1 then 2 (made-up ThermoFisher names)."""
    sites = wells.loc[wells.index.repeat(2)].reset_index(drop=True)
    sites["site"] = np.tile([1, 2], len(wells))
    well_type = np.where(sites["sirna"] >= 1108, "negative_control", "treatment")
    pd.DataFrame({
        "site_id": sites["id_code"] + "_" + sites["site"].astype(str),
        "well_id": sites["id_code"], "cell_type": sites["experiment"].map(cell_type_of),
        "dataset": sites["split"], "experiment": sites["experiment"], "plate": sites["plate"],
        "well": sites["well"], "site": sites["site"], "well_type": well_type,
        "sirna": "s" + (20000 + sites["sirna"]).astype(str), "sirna_id": sites["sirna"],
    }).to_csv(os.path.join(str(root), "metadata.csv"), index=False)


def planted_logits(truth, signal=3.0, noise=1.0, n_classes=N_CLASSES, seed=1):
    """Gaussian noise everywhere plus `signal` on the true class of each well."""
    rng = np.random.default_rng(seed)
    truth = np.asarray(truth)
    z = rng.normal(0.0, noise, (len(truth), n_classes)).astype(np.float32)
    z[np.arange(len(truth)), truth] += signal
    return z


def write_pred(predict_root, channels, fold, model, logits, ids, split="test", shuffle_seed=None):
    """One predict-all output folder; with shuffle_seed the rows are written in another order."""
    d = os.path.join(str(predict_root), channels, f"fold_{fold}", model)
    os.makedirs(d, exist_ok=True)
    ids = np.asarray(ids)
    order = np.arange(len(ids))
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(ids))
    np.save(os.path.join(d, f"pred_{split}.npy"), np.asarray(logits, np.float32)[order])
    pd.DataFrame({"id_code": ids[order]}).to_csv(os.path.join(d, f"ids_{split}.csv"), index=False)
    return d
