"""Average logit files, apply the plate constraint, write submission.csv.

Averaging is hierarchical, as in the reference: the channel subsets of one fold
and model are averaged, then the folds of a model, then the models; every extra
logit file (`--extra-logits`, rows in test.csv order) counts as one more model.
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
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from infer import InferError
from infer.assign import assign_plates, log_softmax
from infer.groups import Groups, derive_groups, format_plate_table, infer_plate_groups
from shards.atomic import write_atomic
from shards.layout import CONTROL_BASE, cell_type_of, parse_channels, parse_id_code
from shards.metadata import load_wells, read_csv_checked

PRED_FILE = "pred_{split}.npy"
IDS_FILE = "ids_{split}.csv"
_FOLD_RE = re.compile(r"^fold_(\d+)$")


# ------------------------------------------------------------------ tables

def load_test_wells(data_dir) -> pd.DataFrame:
    """Test treatment wells (id_code, experiment, cell_type, plate, well) in test.csv order."""
    wells = load_wells(data_dir)
    test = wells[(wells["split"] == "test") & (wells["well_type"] == "treatment")]
    # load_wells sorts; the logits follow the order of test.csv itself.
    order = read_csv_checked(os.path.join(str(data_dir), "test.csv"), ("id_code",))["id_code"]
    test = test.set_index("id_code").loc[order.to_numpy()].reset_index()
    return test[["id_code", "experiment", "cell_type", "plate", "well"]].reset_index(drop=True)


def load_train_groups(data_dir) -> Groups:
    wells = load_wells(data_dir)
    train = wells[(wells["split"] == "train") & (wells["well_type"] == "treatment")]
    return derive_groups(train, source=os.path.join(str(data_dir), "train.csv"))


def wells_from_ids(ids: Sequence[str]) -> pd.DataFrame:
    """experiment, cell_type, plate, well parsed from id_codes (for logits of any split)."""
    rows = []
    for i in ids:
        try:
            e, p, w = parse_id_code(i)
            rows.append((i, e, cell_type_of(e), p, w))
        except ValueError as err:
            raise InferError(str(err)) from None
    return pd.DataFrame(rows, columns=["id_code", "experiment", "cell_type", "plate", "well"])


# ------------------------------------------------------------------ prediction files

@dataclass(frozen=True)
class PredFile:
    channels: str   # folder name, e.g. "[1,2,3,4,5]"
    fold: int | None
    model: str
    path: str

    @property
    def ids_path(self) -> str:
        split = os.path.basename(self.path)[len("pred_"):-len(".npy")]
        return os.path.join(os.path.dirname(self.path), IDS_FILE.format(split=split))

    @property
    def name(self) -> str:
        fold = "" if self.fold is None else f"/fold_{self.fold}"
        return f"{self.channels}{fold}/{self.model}"


def parse_names(value) -> list[str] | None:
    """`a,b` / ('a','b') / None -> list (fire turns `a,b` into a tuple)."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v).strip() for v in value]


def find_predictions(predict_root, split: str = "test",
                     model_names: Iterable[str] | None = None) -> list[PredFile]:
    """Every `<root>/[channels]/fold_<k>/<model>/pred_<split>.npy` (or without the fold level)."""
    root = str(predict_root)
    if not os.path.isdir(root):
        raise InferError(f"predict root {root}: not a directory")
    wanted = set(parse_names(model_names) or []) or None
    fname = PRED_FILE.format(split=split)
    found = []
    for chan in sorted(os.listdir(root)):
        cdir = os.path.join(root, chan)
        if not os.path.isdir(cdir):
            continue
        try:
            parse_channels(chan)
        except ValueError:
            continue  # not a channel-subset folder (e.g. a submission folder)
        for sub in sorted(os.listdir(cdir)):
            m = _FOLD_RE.match(sub)
            if m:
                fold, fdir = int(m.group(1)), os.path.join(cdir, sub)
                models = [(d, os.path.join(fdir, d)) for d in sorted(os.listdir(fdir))]
            else:
                fold, models = None, [(sub, os.path.join(cdir, sub))]
            for model, mdir in models:
                path = os.path.join(mdir, fname)
                if os.path.isfile(path):
                    found.append(PredFile(chan, fold, model, path))
    if not found:
        raise InferError(f"predict root {root}: no [channels]/fold_<k>/<model>/{fname} files; "
                         "run `python -m infer predict-all` first")
    if wanted:
        models = {f.model for f in found}
        missing = wanted - models
        if missing:
            raise InferError(f"predict root {root}: no {fname} for model(s) "
                             f"{', '.join(sorted(missing))}; it has {', '.join(sorted(models))}")
        found = [f for f in found if f.model in wanted]
    return found


def load_logits(path: str, ids: Sequence[str], ids_path: str | None = None,
                like: tuple[int, str] | None = None) -> np.ndarray:
    """Logits of `path` as (len(ids), C) float32 in the order of `ids`.

    With an ids file beside it the rows are matched by id_code; without one
    they must already be in the order of `ids`.
    """
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise InferError(f"{path}: cannot read as a .npy array ({e})") from None
    if arr.ndim != 2:
        raise InferError(f"{path}: logits must be 2-D (wells, classes); got shape {arr.shape}")
    if like is not None and arr.shape[1] != like[0]:
        raise InferError(f"{path}: {arr.shape[1]} class columns, but {like[1]} has {like[0]}; "
                         "logits of one ensemble must share their classes")
    if not np.isfinite(arr).all():
        raise InferError(f"{path}: contains NaN or infinite values")
    ids = list(ids)
    if ids_path and os.path.isfile(ids_path):
        file_ids = pd.read_csv(ids_path, dtype={"id_code": str})
        if "id_code" not in file_ids.columns:
            raise InferError(f"{ids_path}: no id_code column")
        file_ids = file_ids["id_code"].tolist()
        if len(file_ids) != len(arr):
            raise InferError(f"{path}: {len(arr)} rows but {ids_path} lists {len(file_ids)} ids")
        pos = {c: i for i, c in enumerate(file_ids)}
        missing = [c for c in ids if c not in pos]
        extra = len(set(file_ids) - set(ids))
        if missing or extra:
            raise InferError(f"{path}: its ids ({ids_path}) do not match the expected wells: "
                             f"{len(missing)} missing (e.g. {missing[:3]}), {extra} unexpected; "
                             "were these logits predicted from another dataset or split?")
        arr = arr[[pos[c] for c in ids]]
    elif len(arr) != len(ids):
        raise InferError(f"{path}: {len(arr)} rows but there are {len(ids)} wells "
                         "(rows must follow test.csv order)")
    return arr.astype(np.float32, copy=False)


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
          temperature=1.0, min_margin=0.05, quiet=False) -> tuple[Constrained, list[str]]:
    """Averaged, softmaxed, plate-constrained test predictions."""
    wells = load_test_wells(data_dir)
    ids = wells["id_code"].tolist()
    files = find_predictions(predict_root, "test", model_names) if predict_root else []
    logits, used = average_logits(files, ids, [str(p) for p in parse_names(extra_logits) or []])
    groups = load_train_groups(data_dir) if assign else None
    if groups is not None and not quiet:
        print(groups.describe())
    result = apply_constraint(logits, wells, groups, temperature, min_margin, assign)
    if result.plates is not None and not quiet:
        report_plates(result.plates)
    return result, used


def ensemble(data_dir, predict_root=None, model_names=None, extra_logits=None, out=None,
             assign=True, temperature=1.0, min_margin=0.05) -> dict:
    result, used = build(data_dir, predict_root, model_names, extra_logits or (), assign,
                         temperature, min_margin)
    if out is None:
        if predict_root is None:
            raise InferError("give --out when ensembling only --extra-logits")
        out = os.path.join(str(predict_root), "submission.csv")
    labels = result.assigned if result.assigned is not None else result.argmax
    sub = pd.DataFrame({"id_code": result.wells["id_code"], "sirna": labels})
    sub = order_like_sample(sub, data_dir)

    stem = out[:-4] if out.endswith(".csv") else out
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_atomic(out, lambda p: sub.to_csv(p, index=False))
    write_atomic(stem + ".ids.csv", lambda p: result.wells[["id_code"]].to_csv(p, index=False))
    write_atomic(stem + ".probs.npy", lambda p: np.save(p, result.probs))
    if result.plates is not None:
        write_atomic(stem + ".plates.csv", lambda p: result.plates.to_csv(p, index=False))

    summary = dict(submission=out, wells=len(sub), members=len(used))
    if result.plates is not None:
        changed = float(np.mean(result.assigned != result.argmax))
        summary.update(plates=len(result.plates),
                       ambiguous_plates=int(result.plates["ambiguous"].sum()),
                       missing_wells=int(result.plates["missing_wells"].sum()),
                       changed_by_assignment=round(changed, 4))
    print(f"ensembled {len(used)} logit file(s) -> {out} ({len(sub)} wells)")
    return summary


def order_like_sample(sub: pd.DataFrame, data_dir) -> pd.DataFrame:
    """Rows in sample_submission.csv order (test.csv order when there is none)."""
    path = os.path.join(str(data_dir), "sample_submission.csv")
    if not os.path.isfile(path):
        return sub
    sample = read_csv_checked(path, ("id_code",))["id_code"]
    known = set(sub["id_code"])
    unknown = [c for c in sample if c not in known]
    if unknown:
        raise InferError(f"{path}: {len(unknown)} id_code(s) that are not test treatment wells "
                         f"(e.g. {unknown[:3]})")
    left = len(known) - len(set(sample))
    if left:
        print(f"WARNING: {left} test well(s) are not in {path}; they are left out of the submission")
    return sub.set_index("id_code").loc[sample.to_numpy()].reset_index()
