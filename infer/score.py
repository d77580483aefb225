"""Top-1 accuracy, overall and per cell type, with and without the plate assignment.

Two uses:
- a submission against the truth (`test_truth.csv` of the synthetic data, or any
  `id_code,sirna` file); when the ensemble's `<submission>.probs.npy` and
  `<submission>.ids.csv` lie beside it, the plain argmax is scored too;
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

from infer import InferError
from common.arglists import parse_names
from common.run_layout import fold_dirname
from infer.ensemble import apply_constraint, average_logits
from infer.groups import derive_groups
from infer.predictions import find_predictions, load_logits
from infer.wells import int_column, wells_from_ids
from shards.layout import CELL_TYPES, CONTROL_BASE
from shards.metadata import read_csv_checked


def accuracy_table(cell_types: np.ndarray, truth: np.ndarray, preds: dict) -> pd.DataFrame:
    """Rows: all + each cell type present; columns: n and one accuracy per prediction."""
    cell_types = np.asarray(cell_types)
    truth = np.asarray(truth)
    present = [c for c in CELL_TYPES if c in set(cell_types)] + \
        sorted(set(cell_types) - set(CELL_TYPES))
    rows = []
    for name, mask in [("all", np.ones(len(truth), bool))] + \
            [(c, cell_types == c) for c in present]:
        row = {"cell_type": name, "n": int(mask.sum())}
        for key, pred in preds.items():
            row[key] = float(np.mean(np.asarray(pred)[mask] == truth[mask])) if mask.any() else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def format_table(df: pd.DataFrame) -> str:
    return df.to_string(index=False, float_format=lambda v: f"{v:.4f}")


def _read_labels(path: str, what: str) -> pd.DataFrame:
    """id_code,sirna of a submission or truth file: treatment siRNAs 0..1107, one row per well."""
    df = read_csv_checked(path, ("id_code", "sirna"))
    if df.empty:
        raise InferError(f"{path}: the {what} has a header but no rows; expected one row "
                         "id_code,sirna per test well")
    dup = df["id_code"].duplicated()
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        raise InferError(f"{path}, row {i + 1}: id_code {df['id_code'].iloc[i]} appears more "
                         "than once")
    # Test wells are treatment wells: a control class or an unknown number is no answer.
    return pd.DataFrame({"id_code": df["id_code"].to_numpy(),
                         "sirna": int_column(df, path, "sirna", 0, CONTROL_BASE - 1)})


def score_submission(submission, truth) -> dict:
    sub = _read_labels(str(submission), "submission")
    tru = _read_labels(str(truth), "truth file")
    known = set(tru["id_code"])
    unknown = [c for c in sub["id_code"] if c not in known]
    if unknown:
        raise InferError(f"{submission}: {len(unknown)} id_code(s) not in {truth} "
                         f"(e.g. {unknown[:3]}); is this a submission for another dataset?")
    merged = tru.merge(sub, on="id_code", how="left", suffixes=("_true", ""))
    n_missing = int(merged["sirna"].isna().sum())
    if n_missing:
        print(f"WARNING: {n_missing} well(s) of {truth} are not in {submission}; counted as wrong")
    wells = wells_from_ids(merged["id_code"])
    preds = {"submission": merged["sirna"].fillna(-1).astype(np.int64).to_numpy()}

    stem = str(submission)[:-4] if str(submission).endswith(".csv") else str(submission)
    if os.path.isfile(stem + ".probs.npy") and os.path.isfile(stem + ".ids.csv"):
        probs = load_logits(stem + ".probs.npy", merged["id_code"].tolist(), stem + ".ids.csv")
        preds["argmax (no assignment)"] = probs[:, :CONTROL_BASE].argmax(axis=1)
    table = accuracy_table(wells["cell_type"].to_numpy(), merged["sirna_true"].to_numpy(), preds)
    print(f"top-1 accuracy of {submission} against {truth}")
    print(format_table(table))
    return _as_dict(table)


def _as_dict(table: pd.DataFrame) -> dict:
    out = {}
    for r in table.to_dict("records"):
        name = r.pop("cell_type")
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
    print(f"validation top-1 accuracy (per cell type: argmax/assigned), folds from {folds_dir}")
    print(format_table(table))
    return out


class _Stack:
    """The argmax/assigned of several folds' results, concatenated."""

    def __init__(self, parts):
        self.argmax = np.concatenate([p.argmax for p in parts])
        self.assigned = np.concatenate([p.assigned for p in parts])


def score(submission=None, truth=None, predict_root=None, split="valid", folds_dir=None,
          model_names=None, temperature=1.0, min_margin=0.05) -> dict:
    if submission is not None:
        if truth is None:
            raise InferError("score --submission needs --truth (e.g. DATA/test_truth.csv)")
        return score_submission(submission, truth)
    if predict_root is not None:
        if split != "valid":
            raise InferError(f"score --predict-root supports --split valid (got {split!r}); for "
                             "the test set, ensemble first and score the submission")
        if folds_dir is None:
            raise InferError("score --predict-root --split valid needs --folds-dir")
        return score_valid(predict_root, folds_dir, model_names, temperature, min_margin)
    raise InferError("give --submission with --truth, or --predict-root with --folds-dir")
