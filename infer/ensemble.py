"""Average logit files, apply the plate constraint, write submission.csv.

Averaging is hierarchical, as in the reference: the channel subsets of one fold
and model are averaged, then the folds of a model, then the models; every extra
logit file (`--extra-logits`, rows in the source's test order: test.csv, or the
release's metadata.csv) counts as one more model.
The average is softmaxed (after dividing by `temperature`), each test plate's
siRNA group is inferred (`infer.groups`) and its wells are assigned one-to-one
to that group's siRNAs (`infer.assign`).

Beside `submission.csv` it writes `submission.probs.npy` (float32 softmax of
the averaged logits, rows as in `submission.ids.csv`) and
`submission.plates.csv` (the per-plate table), which `score` and
`pseudo-labels` read.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from common.arglists import parse_names
from common.errors import refuse_to_replace
from infer import InferError
from infer.assign import assign_plates, log_softmax
from infer.groups import Groups, format_plate_table, infer_plate_groups, load_train_groups
from common.run_layout import checkpoint_path
from infer.predictions import PredFile, check_member, find_predictions, load_logits
from infer.wells import load_test_wells
from shards.atomic import write_atomic
from shards.layout import CONTROL_BASE
from shards.metadata import read_csv_checked


# ------------------------------------------------------------------ averaging

def average_logits(files: Sequence[PredFile], ids: Sequence[str],
                   extra_logits: Sequence[str] = ()) -> tuple[np.ndarray, list[str]]:
    """Mean over channel subsets, then folds, then models (+ extra files as models)."""
    like = None  # (columns, path) of the first file: every other must match it
    by_model: dict[str, dict] = {}
    used = []
    for f in files:
        arr = load_logits(f.path, ids, f.ids_path, like)
        like = like or (arr.shape[1], f.path)
        by_model.setdefault(f.model, {}).setdefault(f.fold, []).append(arr)
        used.append(f.name)
    members = []
    for folds in by_model.values():
        members.append(np.mean([np.mean(subsets, axis=0) for subsets in folds.values()], axis=0))
    for path in extra_logits:
        members.append(load_logits(str(path), ids, None, like))
        like = like or (members[-1].shape[1], str(path))
        used.append(str(path))
    if not members:
        raise InferError("nothing to ensemble: give --predict-root and/or --extra-logits")
    return np.mean(members, axis=0).astype(np.float32), used


# ------------------------------------------------------------------ the constraint

@dataclass
class Constrained:
    wells: pd.DataFrame        # id_code, experiment, cell_type, plate, well (+ sirna, p_sirna)
    probs: np.ndarray          # (n, C) float32 softmax
    argmax: np.ndarray         # (n,) best treatment class per well
    assigned: np.ndarray | None  # (n,) plate-constrained siRNA, None without assignment
    plates: pd.DataFrame | None


def apply_constraint(logits: np.ndarray, wells: pd.DataFrame, groups: Groups | None,
                     temperature: float = 1.0, min_margin: float = 0.05,
                     assign: bool = True) -> Constrained:
    if float(temperature) <= 0:
        raise InferError(f"--temperature {temperature}: must be > 0")
    logp = log_softmax(np.asarray(logits, np.float64) / float(temperature))
    probs = np.exp(logp).astype(np.float32)
    # Controls are never an answer for a treatment well.
    argmax = logp[:, :CONTROL_BASE].argmax(axis=1).astype(np.int64)
    if not assign:
        return Constrained(wells, probs, argmax, None, None)
    plates = infer_plate_groups(probs, wells, groups, min_margin=min_margin)
    assigned = assign_plates(logp, wells, plates, groups)
    return Constrained(wells, probs, argmax, assigned, plates)


def report_plates(plates: pd.DataFrame, out=print) -> None:
    out(format_plate_table(plates))
    amb = plates[plates["ambiguous"]]
    if len(amb):
        out(f"WARNING: {len(amb)} plate(s) with an ambiguous group (margin below threshold): "
            + ", ".join(f"{e}_{p}" for e, p in amb[["experiment", "plate"]].itertuples(index=False)))
    miss = plates[plates["missing_wells"] > 0]
    if len(miss):
        out(f"{len(miss)} plate(s) with missing wells ({int(miss['missing_wells'].sum())} in all); "
            "their unused siRNAs are left out of the assignment")


# ------------------------------------------------------------------ the command

def build(data_dir, predict_root=None, model_names=None, extra_logits=(), assign=True,
          temperature=1.0, min_margin=0.05, quiet=False, allow_missing=False,
          model_root=None) -> tuple[Constrained, list[str]]:
    """Averaged, softmaxed, plate-constrained test predictions.

    Every run folder under `predict_root` (and every finished run under
    `model_root`, when given) must hold its pred_test.npy unless
    `allow_missing` (see infer.predictions.find_predictions)."""
    wells = load_test_wells(data_dir)
    ids = wells["id_code"].tolist()
    names = parse_names(model_names, "--model-names")
    if predict_root:
        files = find_predictions(predict_root, "test", names, allow_missing=allow_missing,
                                 model_root=model_root)
    elif model_root is not None:
        raise InferError("--model-root is checked against --predict-root; give both")
    else:
        files = []
    for f in files:
        check_member(f.path, f.split, None if model_root is None else
                     checkpoint_path(os.path.join(str(model_root), *f.name.split("/"))))
    extra = parse_names(extra_logits or None, "--extra-logits") or []
    logits, used = average_logits(files, ids, extra)
    groups = load_train_groups(data_dir) if assign else None
    if groups is not None and not quiet:
        print(groups.describe())
    result = apply_constraint(logits, wells, groups, temperature, min_margin, assign)
    if result.plates is not None and not quiet:
        report_plates(result.plates)
    return result, used


def ensemble(data_dir, predict_root=None, model_names=None, extra_logits=None, out=None,
             assign=True, temperature=1.0, min_margin=0.05, allow_missing=False,
             model_root=None, overwrite=False) -> dict:
    if out is None and predict_root is not None:
        out = os.path.join(str(predict_root), "submission.csv")
    if out is not None and not overwrite:
        refuse_to_replace(submission_files(str(out)), "a submission or its sidecar")
    result, used = build(data_dir, predict_root, model_names, extra_logits or (), assign,
                         temperature, min_margin, allow_missing=allow_missing,
                         model_root=model_root)
    if out is None:
        if predict_root is None:
            raise InferError("give --out when ensembling only --extra-logits")
        out = os.path.join(str(predict_root), "submission.csv")
    labels = result.assigned if result.assigned is not None else result.argmax
    sub = pd.DataFrame({"id_code": result.wells["id_code"], "sirna": labels})
    sub = order_like_sample(sub, data_dir)

    stem = out[:-4] if out.endswith(".csv") else out
    if not overwrite:
        refuse_to_replace(submission_files(out), "a submission or its sidecar")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    writes = [(stem + ".ids.csv", lambda p: result.wells[["id_code"]].to_csv(p, index=False)),
              (stem + ".probs.npy", lambda p: np.save(p, result.probs))]
    if result.plates is not None:
        writes.append((stem + ".plates.csv", lambda p: result.plates.to_csv(p, index=False)))
    writes.append((out, lambda p: sub.to_csv(p, index=False)))   # last: it marks a whole set
    done = []
    try:
        for path, write in writes:
            done.append(write_atomic(path, write))
    except BaseException:
        for path in done:   # a full disk must not leave sidecars of a submission never written
            os.remove(path)
        raise

    summary = dict(submission=out, wells=len(sub), members=len(used))
    if result.plates is not None:
        changed = float(np.mean(result.assigned != result.argmax))
        summary.update(plates=len(result.plates),
                       ambiguous_plates=int(result.plates["ambiguous"].sum()),
                       missing_wells=int(result.plates["missing_wells"].sum()),
                       changed_by_assignment=round(changed, 4))
    print(f"ensembled {len(used)} logit file(s) -> {out} ({len(sub)} wells)")
    return summary


def submission_files(out: str) -> list[str]:
    """The submission and the sidecars the ensemble writes beside it."""
    stem = out[:-4] if out.endswith(".csv") else out
    return [out] + [stem + s for s in (".ids.csv", ".probs.npy", ".plates.csv")]


def order_like_sample(sub: pd.DataFrame, data_dir) -> pd.DataFrame:
    """Rows in sample_submission.csv order; without one (the release layout has none) in
    the source's test order (test.csv, or metadata.csv), which is `sub`'s own."""
    path = os.path.join(str(data_dir), "sample_submission.csv")
    if not os.path.isfile(path):
        return sub
    sample = read_csv_checked(path, ("id_code",))["id_code"]
    dup = sample.duplicated()
    if dup.any():
        # One row per well in a submission: a repeated id would repeat its row.
        i = int(np.flatnonzero(dup.to_numpy())[0])
        first = int(np.flatnonzero((sample == sample.iloc[i]).to_numpy())[0])
        raise InferError(f"{path}, row {i + 1}: id_code {sample.iloc[i]} appears again "
                         f"(first in row {first + 1}); each test well must be listed once"
                         + (f" ({int(dup.sum()) - 1} more repeated row(s))" if dup.sum() > 1 else ""))
    known = set(sub["id_code"])
    unknown = [c for c in sample if c not in known]
    if unknown:
        raise InferError(f"{path}: {len(unknown)} id_code(s) that are not test treatment wells "
                         f"(e.g. {unknown[:3]})")
    left = len(known) - len(set(sample))
    if left:
        print(f"WARNING: {left} test well(s) are not in {path}; they are left out of the submission")
    return sub.set_index("id_code").loc[sample.to_numpy()].reset_index()
