"""Top-1 accuracy, overall and per cell type, with and without the plate assignment.

Three uses:
- a submission against the test labels (infer.truth: the release's
  `metadata.csv`, `test_truth.csv` of the synthetic data, or any `id_code,sirna`
  file), overall, per cell type and per experiment; when the ensemble's
  `<submission>.probs.npy` and `<submission>.ids.csv` lie beside it, the plain
  argmax is scored too;
- the test logits of `predict-all` (each run, and their ensemble) against those
  labels, with and without the plate assignment;
- the validation logits of `predict-all --split valid`, per
  `[channels]/fold_k/model`, per fold (subsets and models averaged) and over
  all folds (out-of-fold), against the labels of the fold CSVs.
"""
from __future__ import annotations

import glob
import os
import re

import numpy as np
import pandas as pd

from common.arglists import parse_names
from common.errors import BadInput
from common.run_layout import fold_dirname
from infer import InferError
from infer.ensemble import apply_constraint, average_logits
from infer.groups import derive_groups, load_train_groups
from infer.predictions import find_predictions, load_logits
from infer.truth import read_labels, read_truth
from infer.wells import int_column, load_test_wells, wells_from_ids
from shards.layout import CELL_TYPES, CONTROL_BASE
from shards.metadata import read_csv_checked
from shards.source_layout import detect_layout


def accuracy_table(cell_types: np.ndarray, truth: np.ndarray, preds: dict,
                   column: str = "cell_type") -> pd.DataFrame:
    """Rows: all + each group present (cell types in their usual order, else sorted);
    columns: `column`, n and one accuracy per prediction."""
    cell_types = np.asarray(cell_types)
    truth = np.asarray(truth)
    present = [c for c in CELL_TYPES if c in set(cell_types)] + \
        sorted(set(cell_types) - set(CELL_TYPES))
    rows = []
    for name, mask in [("all", np.ones(len(truth), bool))] + \
            [(c, cell_types == c) for c in present]:
        row = {column: name, "n": int(mask.sum())}
        for key, pred in preds.items():
            row[key] = float(np.mean(np.asarray(pred)[mask] == truth[mask])) if mask.any() else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def format_table(df: pd.DataFrame) -> str:
    return df.to_string(index=False, float_format=lambda v: f"{v:.4f}")


def grouped_scores(wells: pd.DataFrame, truth: np.ndarray, preds: dict) -> tuple:
    """(per cell type table, per experiment table, their dict: cell-type rows by name plus
    `experiments`: experiment -> row) of predictions for `wells` (id_codes parsed)."""
    by_cell = accuracy_table(wells["cell_type"].to_numpy(), truth, preds)
    by_exp = accuracy_table(wells["experiment"].to_numpy(), truth, preds, column="experiment")
    out = _as_dict(by_cell)
    out["experiments"] = {k: v for k, v in _as_dict(by_exp, "experiment").items() if k != "all"}
    return by_cell, by_exp.iloc[1:], out


def score_submission(submission, truth) -> dict:
    """Top-1 of a submission (and of the argmax beside it) against `truth` (infer.truth),
    overall, per cell type and per experiment."""
    sub = read_labels(str(submission), "submission")
    tru = read_truth(truth)
    known = set(tru.labels["id_code"])
    unknown = [c for c in sub["id_code"] if c not in known]
    if unknown:
        raise InferError(f"{submission}: {len(unknown)} id_code(s) not in {tru.path} "
                         f"(e.g. {unknown[:3]}); is this a submission for another dataset?")
    merged = tru.labels.merge(sub, on="id_code", how="left", suffixes=("_true", ""))
    n_missing = int(merged["sirna"].isna().sum())
    if n_missing:
        print(f"WARNING: {n_missing} well(s) of {tru.path} are not in {submission}; counted "
              "as wrong")
    wells = wells_from_ids(merged["id_code"])
    preds = {"submission": merged["sirna"].fillna(-1).astype(np.int64).to_numpy()}

    stem = str(submission)[:-4] if str(submission).endswith(".csv") else str(submission)
    if os.path.isfile(stem + ".probs.npy") and os.path.isfile(stem + ".ids.csv"):
        probs = load_logits(stem + ".probs.npy", merged["id_code"].tolist(), stem + ".ids.csv")
        preds["argmax (no assignment)"] = probs[:, :CONTROL_BASE].argmax(axis=1)
    by_cell, by_exp, out = grouped_scores(wells, merged["sirna_true"].to_numpy(), preds)
    print(f"top-1 accuracy of {submission} against {tru.path}")
    print(format_table(by_cell))
    print(format_table(by_exp))
    return out


def _as_dict(table: pd.DataFrame, column: str = "cell_type") -> dict:
    out = {}
    for r in table.to_dict("records"):
        name = r.pop(column)
        out[name] = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()}
    return out


# ------------------------------------------------------------------ validation logits

_FOLD_CSV = re.compile(r"^valid_(\d+)\.csv$")


def read_folds(folds_dir) -> dict[int, tuple[pd.DataFrame, pd.DataFrame]]:
    """fold k -> (train_k rows, valid_k rows) for every valid_k.csv with a train_k.csv."""
    folds_dir = str(folds_dir)
    out = {}
    for path in sorted(glob.glob(os.path.join(folds_dir, "valid_*.csv"))):
        m = _FOLD_CSV.match(os.path.basename(path))
        if not m:
            continue
        k = int(m.group(1))
        train_path = os.path.join(folds_dir, f"train_{k}.csv")
        if not os.path.isfile(train_path):
            raise InferError(f"{path}: no matching {train_path}")
        frames = []
        for p in (train_path, path):
            df = read_csv_checked(p, ("id_code", "experiment", "plate", "well", "sirna"))
            df["plate"] = int_column(df, p, "plate", 1)
            df["sirna"] = int_column(df, p, "sirna", 0)
            frames.append(df)
        out[k] = tuple(frames)
    if not out:
        raise InferError(f"{folds_dir}: no train_k.csv / valid_k.csv fold files "
                         "(write them with `python -m prep folds`)")
    return out


def _labelled_train_rows(df: pd.DataFrame) -> pd.DataFrame:
    # Pseudo-labelled test rows (dataset == test) are guesses, not labels.
    return df[df["dataset"] == "train"] if "dataset" in df.columns else df


def score_valid(predict_root, folds_dir, model_names=None, temperature=1.0,
                min_margin=0.05) -> dict:
    folds = read_folds(folds_dir)
    all_rows = pd.concat([_labelled_train_rows(pd.concat(f)) for f in folds.values()])
    groups = derive_groups(all_rows.drop_duplicates("id_code"), source=f"{folds_dir}/*.csv")
    # Scoring a subset is not a loss (nothing is written): the missing runs are listed.
    files = find_predictions(predict_root, "valid", parse_names(model_names), allow_missing=True)

    results, oof = [], []
    for k in sorted({f.fold for f in files}, key=lambda v: -1 if v is None else v):
        if k not in folds:
            raise InferError(f"{predict_root}: validation logits for fold {k} but {folds_dir} "
                             f"has no valid_{k}.csv")
        valid = _labelled_train_rows(folds[k][1]).reset_index(drop=True)
        ids = valid["id_code"].tolist()
        wells = wells_from_ids(ids)
        truth = valid["sirna"].to_numpy()
        fold_files = [f for f in files if f.fold == k]
        for f in fold_files + [None]:
            if f is None:
                if len(fold_files) < 2:
                    continue
                logits, _ = average_logits(fold_files, ids)
                name = f"{fold_dirname(k)} ensemble ({len(fold_files)} files)"
            else:
                logits = load_logits(f.path, ids, f.ids_path)
                name = f.name
            res = apply_constraint(logits, wells, groups, temperature, min_margin)
            results.append((name, wells["cell_type"].to_numpy(), truth, res))
            if f is None or len(fold_files) == 1:
                oof.append((wells["cell_type"].to_numpy(), truth, res))
    if len(oof) > 1:
        results.append(("all folds (out-of-fold)",
                        np.concatenate([o[0] for o in oof]), np.concatenate([o[1] for o in oof]),
                        _Stack([o[2] for o in oof])))
    table, out = _summary(results)
    print(f"validation top-1 accuracy (per cell type: argmax/assigned), folds from {folds_dir}")
    print(format_table(table))
    return out


def score_test(predict_root, truth, data_dir=None, model_names=None, temperature=1.0,
               min_margin=0.05) -> dict:
    """The test logits under `predict_root` (each run, and their ensemble) against the
    public test labels, with and without the plate assignment; the plate groups come from
    the train labels of `data_dir` (default: the directory of the truth file)."""
    tru = read_truth(truth)
    data_dir = _data_dir_of(data_dir, tru.path)
    wells = load_test_wells(data_dir)
    ids = wells["id_code"].tolist()
    label = tru.labels.set_index("id_code")["sirna"]
    unlabelled = [c for c in ids if c not in label.index]
    if unlabelled:
        raise InferError(f"{tru.path}: no label for {len(unlabelled)} of the {len(ids)} test "
                         f"wells of {data_dir} (e.g. {unlabelled[:3]}); score against the labels "
                         "of the data set the predictions were made from")
    truth_ids = label.loc[ids].to_numpy()
    groups = load_train_groups(data_dir)
    files = find_predictions(predict_root, "test", parse_names(model_names), allow_missing=True)
    results = []
    for f in files + ([None] if len(files) > 1 else []):
        if f is None:
            logits, _ = average_logits(files, ids)
            name = f"ensemble ({len(files)} files)"
        else:
            logits, name = load_logits(f.path, ids, f.ids_path), f.name
        res = apply_constraint(logits, wells, groups, temperature, min_margin)
        results.append((name, wells["cell_type"].to_numpy(), truth_ids, res))
    table, out = _summary(results)
    # The last row (the ensemble, or the only run) in detail: per cell type and experiment.
    name, _, _, res = results[-1]
    by_cell, by_exp, detail = grouped_scores(
        wells, truth_ids, {"top1": res.argmax, "top1_assigned": res.assigned})
    out[name] = detail
    print(f"test top-1 accuracy (per cell type: argmax/assigned) against {tru.path}")
    print(format_table(table))
    print(f"{name}, with (top1_assigned) and without (top1) the plate assignment:")
    print(format_table(by_cell))
    print(format_table(by_exp))
    return out


def _data_dir_of(data_dir, truth_path: str) -> str:
    if data_dir is not None:
        return str(data_dir)
    here = os.path.dirname(os.path.abspath(truth_path))
    try:
        detect_layout(here)
    except BadInput:
        raise InferError(f"{truth_path}: its directory is not an RxRx1 data directory; give "
                         "--data-dir (the data the predictions were made from: its train labels "
                         "give the plate groups, its test list the wells)") from None
    return here


def _summary(results) -> tuple[pd.DataFrame, dict]:
    """One row per (name, cell types, truth, result): n, top1, top1_assigned and per cell
    type argmax/assigned; and each result's per-cell-type dict."""
    rows, out = [], {}
    for name, cts, truth, res in results:
        t = accuracy_table(cts, truth, {"top1": res.argmax, "top1_assigned": res.assigned})
        out[name] = _as_dict(t)
        row = {"predictions": name, "n": int(t.loc[0, "n"]),
               "top1": t.loc[0, "top1"], "top1_assigned": t.loc[0, "top1_assigned"]}
        for r in t.iloc[1:].itertuples(index=False):
            row[r.cell_type] = f"{r.top1:.3f}/{r.top1_assigned:.3f}"
        rows.append(row)
    table = pd.DataFrame(rows)
    cts = [c for c in table.columns if c not in ("predictions", "n", "top1", "top1_assigned")]
    table = table[["predictions", "n", "top1", "top1_assigned"]
                  + sorted(cts, key=lambda c: (CELL_TYPES + (c,)).index(c))].fillna("")
    return table, out


class _Stack:
    """The argmax/assigned of several folds' results, concatenated."""

    def __init__(self, parts):
        self.argmax = np.concatenate([p.argmax for p in parts])
        self.assigned = np.concatenate([p.assigned for p in parts])


def score(submission=None, truth=None, predict_root=None, split="valid", folds_dir=None,
          model_names=None, temperature=1.0, min_margin=0.05, data_dir=None) -> dict:
    if submission is not None:
        if truth is None:
            raise InferError("score --submission needs --truth (the release's DATA/metadata.csv, "
                             "or DATA/test_truth.csv of synthetic data)")
        return score_submission(submission, truth)
    if predict_root is not None:
        if split == "test":
            if truth is None:
                raise InferError("score --predict-root --split test needs --truth (the "
                                 "release's DATA/metadata.csv, or DATA/test_truth.csv)")
            return score_test(predict_root, truth, data_dir, model_names, temperature,
                              min_margin)
        if split != "valid":
            raise InferError(f"score --predict-root --split {split!r}: choose valid (against "
                             "--folds-dir) or test (against --truth)")
        if folds_dir is None:
            raise InferError("score --predict-root --split valid needs --folds-dir")
        return score_valid(predict_root, folds_dir, model_names, temperature, min_margin)
    raise InferError("give --submission with --truth, or --predict-root with --folds-dir "
                     "(--split valid) or --truth (--split test)")
