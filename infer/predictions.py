"""The prediction files: what predict-all writes per run and ensemble/score read.

    PRED/<[channels]>/fold_<k>/<model>/       (common.run_layout.run_subdir)
        pred_<split>.npy    float32 logits, (wells, classes)
        ids_<split>.csv     id_code (+ sirna for valid) of each row, in row order
        pred_<split>.json   checkpoint (path and digest of its tensors), epoch, TTA,
                            sites per well, the ids' digest, whether the run had finished

`pred_<split>.npy` is written last, so its presence means the run's
prediction is whole; a run folder without it is a prediction that was started
and not finished (or never made) and is reported as missing, never silently
left out of an ensemble.  Every file is written atomically (shards.atomic).

A prediction proves what it is: `check_member` refuses one whose checkpoint
has changed since (its digest differs), whose ids file is not the one written
with it, or that came from a Part I (control) checkpoint.  Files without a
pred_<split>.json (other tools' logits) are taken as they are.

This module sits below both predict (which writes) and ensemble/score/pseudo
(which read), so the format has one home.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from common.run_layout import RunPath, checkpoint_path, find_run_dirs, fold_dirname, run_subdir
from infer import InferError
from shards.layout import N_TREATMENTS
from shards.atomic import write_atomic
from shards.metadata import read_csv_checked

PRED_FILE = "pred_{split}.npy"
IDS_FILE = "ids_{split}.csv"
META_FILE = "pred_{split}.json"


def pred_dir(root: str, channels, fold: int | None, model: str) -> str:
    """PRED/<[channels]>/fold_<k>/<model> (no fold level for a control run)."""
    return os.path.join(str(root), run_subdir(channels, fold, model))


def write_predictions(out: str, split: str, logits: np.ndarray, ids: pd.DataFrame,
                      meta: dict) -> str:
    """ids, meta, then logits (last: its presence marks a whole prediction); returns its path."""
    os.makedirs(out, exist_ok=True)
    write_atomic(os.path.join(out, IDS_FILE.format(split=split)),
                 lambda p: ids.to_csv(p, index=False))
    write_atomic(os.path.join(out, META_FILE.format(split=split)),
                 lambda p: open(p, "w").write(json.dumps(meta, indent=1)))
    pred_path = os.path.join(out, PRED_FILE.format(split=split))
    write_atomic(pred_path, lambda p: np.save(p, np.asarray(logits, np.float32)))
    return pred_path


def ids_digest(ids: Sequence[str]) -> str:
    """sha256 of the id_codes in row order: an ids file edited or reordered shows."""
    return hashlib.sha256("\n".join(map(str, ids)).encode()).hexdigest()


def read_meta(out: str, split: str) -> dict | None:
    """pred_<split>.json of a prediction folder; None when there is none."""
    path = os.path.join(out, META_FILE.format(split=split))
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise InferError(f"{path}: cannot be read as JSON ({e}); run predict-all again with "
                         "--overwrite for this run") from None
    if not isinstance(meta, dict):
        raise InferError(f"{path}: not a JSON object; run predict-all again with --overwrite")
    return meta


def check_member(pred_path: str, split: str, checkpoint: str | None = None) -> dict | None:
    """Refuse a prediction that is not what it says: from a control checkpoint, its ids file
    not the one written with it, or its checkpoint (`checkpoint`, else the one it records,
    when present) changed since.  Returns its meta (None for bare logits)."""
    from train import checkpoint_digest

    out = os.path.dirname(pred_path)
    meta = read_meta(out, split)
    if meta is None:
        return None
    if meta.get("stage") == "control" or (meta.get("trained_classes") or N_TREATMENTS) < N_TREATMENTS:
        raise InferError(f"{pred_path}: predicted by a Part I control checkpoint "
                         f"({meta.get('checkpoint')}, {meta.get('trained_classes')} classes); "
                         "ensemble and pseudo-labels take finetune/pseudo predictions")
    ids_path = os.path.join(out, IDS_FILE.format(split=split))
    if meta.get("ids_sha256") and os.path.isfile(ids_path) \
            and ids_digest(read_ids(ids_path)) != meta["ids_sha256"]:
        raise InferError(f"{ids_path}: not the ids written with {pred_path} (rows edited or "
                         "reordered); run predict-all again with --overwrite for this run")
    ck = checkpoint or meta.get("checkpoint")
    saved = meta.get("checkpoint_digest")
    if saved and ck and os.path.isfile(ck):
        now = checkpoint_digest(ck)
        if now != saved:
            raise InferError(f"{pred_path} was predicted from checkpoint {ck} with tensors "
                             f"{saved[:12]}, but {ck} now holds {now[:12]}; run predict-all "
                             "again (it redoes predictions whose checkpoint changed)")
    if meta.get("finished") is False:
        print(f"WARNING: {pred_path} is of a run that had not finished "
              "(predict-all --allow-unfinished)", file=sys.stderr)
    return meta


@dataclass(frozen=True)
class PredFile:
    channels: str   # folder name, e.g. "[1,2,3,4,5]"
    fold: int | None
    model: str
    path: str       # .../pred_<split>.npy
    split: str = "test"

    @property
    def ids_path(self) -> str:
        return os.path.join(os.path.dirname(self.path), IDS_FILE.format(split=self.split))

    @property
    def name(self) -> str:
        """`[1,2,3,4,5]/fold_0/<model>` as the folders spell it."""
        fold = [] if self.fold is None else [fold_dirname(self.fold)]
        return "/".join([self.channels, *fold, self.model])


def _channels_folder(run: RunPath) -> str:
    """The run's channel folder as spelled on disk (the level above fold_<k>, or above the model)."""
    up = os.path.dirname(run.path)
    return os.path.basename(up if run.fold is None else os.path.dirname(up))


def _pred_file(run: RunPath, split: str) -> PredFile:
    return PredFile(_channels_folder(run), run.fold, run.model,
                    os.path.join(run.path, PRED_FILE.format(split=split)), split)


def find_predictions(predict_root, split: str = "test", model_names: Iterable[str] | None = None,
                     allow_missing: bool = False, model_root=None) -> list[PredFile]:
    """The `pred_<split>.npy` of every run folder under `predict_root`.

    Expected members: every `[channels]/fold_<k>/<model>` folder under the
    predict root, and, with `model_root`, every run there with a
    checkpoints/best.pth (of the selected models). An expected member without
    its pred file is an error listing them all, unless `allow_missing` (then a
    warning on stderr).
    """
    root = str(predict_root)
    if not os.path.isdir(root):
        raise InferError(f"predict root {root}: not a directory")
    wanted = list(model_names) if model_names else None
    fname = PRED_FILE.format(split=split)
    runs = find_run_dirs(root)
    found, missing = [], []
    for run in runs:
        f = _pred_file(run, split)
        (found if os.path.isfile(f.path) else missing).append(f)
    if model_root is not None:
        missing += _missing_from_model_root(str(model_root), root, split, wanted)
    if wanted:
        models = {f.model for f in found}
        absent = [m for m in wanted if m not in models]
        if absent and found:
            raise InferError(f"predict root {root}: no {fname} for model(s) "
                             f"{', '.join(sorted(absent))}; it has {', '.join(sorted(models))}")
        found = [f for f in found if f.model in wanted]
        missing = [f for f in missing if f.model in wanted]
    if not found:
        raise InferError(f"predict root {root}: no [channels]/fold_<k>/<model>/{fname} files"
                         + (f" for model(s) {', '.join(wanted)}" if wanted else "")
                         + "; run `python -m infer predict-all` first")
    if missing:
        names = ", ".join(sorted({f.name for f in missing}))
        if not allow_missing:
            raise InferError(f"predict root {root}: {len(missing)} run(s) without {fname}: "
                             f"{names}; run predict-all for them (it resumes), or leave them "
                             "out with --allow-missing")
        print(f"WARNING: {len(missing)} run(s) without {fname} left out (--allow-missing): "
              f"{names}", file=sys.stderr)
    return found


def _missing_from_model_root(model_root: str, predict_root: str, split: str,
                             wanted) -> list[PredFile]:
    """Finished runs (best.pth) under the model root whose prediction is not in the predict root."""
    if not os.path.isdir(model_root):
        raise InferError(f"--model-root {model_root}: not a directory")
    out = []
    for run in find_run_dirs(model_root, model_names=wanted):
        if not os.path.isfile(checkpoint_path(run.path)):
            continue
        path = os.path.join(pred_dir(predict_root, run.channels, run.fold, run.model),
                            PRED_FILE.format(split=split))
        if not os.path.isfile(path):
            out.append(PredFile(_channels_folder(run), run.fold, run.model, path, split))
    return out


def read_ids(path: str) -> list[str]:
    """The id_code column of an ids file (or any id_code CSV), in row order."""
    return read_csv_checked(path, ("id_code",))["id_code"].tolist()


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
        file_ids = read_ids(ids_path)
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
                         "(rows must follow the data directory's test order: test.csv, or metadata.csv)")
    return arr.astype(np.float32, copy=False)
