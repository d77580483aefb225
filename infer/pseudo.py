"""Part III inputs: confident, plate-assigned test wells added to every fold's train CSV.

A test well becomes a pseudo-labelled row when the ensemble's probability of
the siRNA the plate assignment gave it is at least `min_confidence`. With
`confidence="group"` (the default) that probability is taken within the
plate's siRNA group — the assignment already decided the well belongs to it,
and over all 1108 classes a model spreads mass on siRNAs the plate cannot
hold (measured on the demo: at p >= 0.6, 88 of 255 test wells at 85 %
correct within the group against 9 wells over all classes); `"full"` uses the
plain softmax.  For each
fold k of `folds_dir`, `train_k.csv` = the fold's labelled train rows + the
pseudo rows, `valid_k.csv` = the fold's valid rows unchanged (validation stays
on true labels), in the reference's schema
`id_code,experiment,plate,well,sirna,experiment_type,dataset`.
"""
from __future__ import annotations

import os

import numpy as np
import pandas as pd

from common.errors import refuse_to_replace
from infer import InferError
from infer.ensemble import build, load_train_groups
from infer.score import read_folds
from shards.atomic import write_atomic

PSEUDO_COLUMNS = ("id_code", "experiment", "plate", "well", "sirna", "experiment_type", "dataset")


def _schema(df: pd.DataFrame, dataset: str) -> pd.DataFrame:
    from shards.layout import cell_type_of

    df = df.copy()
    if "experiment_type" not in df.columns:
        df["experiment_type"] = df["experiment"].map(cell_type_of)
    if "dataset" not in df.columns:
        df["dataset"] = dataset
    return df[list(PSEUDO_COLUMNS)]


CONFIDENCE_MODES = ("group", "full")


def assigned_confidence(result, groups=None) -> np.ndarray:
    """p(assigned siRNA), renormalized over the assigned siRNA's plate group when `groups`."""
    n = len(result.assigned)
    conf = result.probs[np.arange(n), result.assigned].astype(np.float64)
    if groups is None:
        return conf
    group_of = groups.group_of()
    mass = np.empty(n)
    for g, members in enumerate(groups.members):
        rows = np.flatnonzero([group_of.get(int(a)) == g for a in result.assigned])
        mass[rows] = result.probs[np.ix_(rows, np.asarray(members))].sum(axis=1)
    return conf / np.maximum(mass, 1e-12)


def select_pseudo(result, min_confidence: float, groups=None) -> pd.DataFrame:
    """Pseudo rows (reference schema plus `confidence`) from an assigned ensemble."""
    if result.assigned is None:
        raise InferError("pseudo-labels need the plate assignment")
    conf = assigned_confidence(result, groups)
    keep = conf >= float(min_confidence)
    w = result.wells[keep]
    return pd.DataFrame({
        "id_code": w["id_code"].to_numpy(), "experiment": w["experiment"].to_numpy(),
        "plate": w["plate"].to_numpy(), "well": w["well"].to_numpy(),
        "sirna": result.assigned[keep], "experiment_type": w["cell_type"].to_numpy(),
        "dataset": "test", "confidence": conf[keep],
    })


def same_directory(a, b) -> bool:
    """Whether two paths name one directory, through symlinks too (samefile needs both to
    exist; realpath covers an out dir not yet made)."""
    a, b = str(a), str(b)
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def pseudo_labels(data_dir, predict_root, folds_dir, out_dir, min_confidence=0.5,
                  model_names=None, extra_logits=None, temperature=1.0, min_margin=0.05,
                  confidence="group", allow_missing=False, overwrite=False) -> dict:
    if not 0.0 <= float(min_confidence) <= 1.0:
        raise InferError(f"--min-confidence {min_confidence}: must be a probability in [0, 1]")
    if confidence not in CONFIDENCE_MODES:
        raise InferError(f"--confidence {confidence!r}: choose one of {', '.join(CONFIDENCE_MODES)}")
    if same_directory(out_dir, folds_dir):
        raise InferError(f"--out-dir {out_dir} is the folds directory {folds_dir} (compared "
                         "through links); writing there would overwrite the fold CSVs "
                         "(use e.g. csv/pseudo)")
    folds = read_folds(folds_dir)
    outputs = [os.path.join(str(out_dir), f"{s}_{k}.csv") for k in sorted(folds)
               for s in ("train", "valid")] + [os.path.join(str(out_dir), "pseudo_test.csv")]
    if not overwrite:
        refuse_to_replace(outputs, "a pseudo-label CSV")
    result, _ = build(data_dir, predict_root, model_names, extra_logits or (), True,
                      temperature, min_margin, allow_missing=allow_missing)
    groups = load_train_groups(data_dir) if confidence == "group" else None
    pseudo = select_pseudo(result, min_confidence, groups)
    n_test = len(result.wells)
    within = " within its plate group" if groups is not None else ""
    print(f"{len(pseudo)} of {n_test} test wells have p(assigned siRNA){within} >= "
          f"{min_confidence} and become pseudo-labelled rows")
    if pseudo.empty:
        print("WARNING: no test well passed the threshold; the train CSVs hold train rows only")

    os.makedirs(str(out_dir), exist_ok=True)
    paths = []
    pseudo_rows = pseudo[list(PSEUDO_COLUMNS)]
    for k, (train, valid) in sorted(folds.items()):
        if "dataset" in train.columns and (train["dataset"] != "train").any():
            # A folds dir that already holds pseudo rows: start again from the true labels.
            train = train[train["dataset"] == "train"]
        train_k = pd.concat([_schema(train, "train"), pseudo_rows], ignore_index=True)
        valid_k = _schema(valid, "train")
        for name, df in ((f"train_{k}.csv", train_k), (f"valid_{k}.csv", valid_k)):
            path = os.path.join(str(out_dir), name)
            paths.append(write_atomic(path, lambda p, df=df: df.to_csv(p, index=False)))
        print(f"fold {k}: {len(train)} train + {len(pseudo_rows)} pseudo rows, {len(valid)} valid")
    write_atomic(os.path.join(str(out_dir), "pseudo_test.csv"),
                 lambda p: pseudo.to_csv(p, index=False))
    return dict(out_dir=str(out_dir), folds=sorted(folds), pseudo_rows=len(pseudo),
                test_wells=n_test, min_confidence=float(min_confidence), confidence=confidence)
