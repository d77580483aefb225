"""The embeddings directory `infer embed` writes and `infer map` reads (no torch here).

    EMB/embed.json        what was embedded: the store (its sites table's sha256), the
                          checkpoint (path, sha256), TTA, channels; `complete` when done
    EMB/parts/<exp>.npy   one experiment's wells (float32), the unit a resumed run skips
    EMB/embeddings.zarr   float32 (n_wells, d), zarr v3, one row per line of wells.csv
    EMB/wells.csv         id_code, experiment, plate, well, cell_type, well_type, sirna
                          (-1 where the label is unknown: test wells without --labels)
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pandas as pd

from infer import InferError
from shards.atomic import write_atomic, write_bytes
from shards.layout import N_SIRNAS

EMBED_JSON = "embed.json"
EMB_ZARR = "embeddings.zarr"
WELLS_CSV = "wells.csv"
PARTS = "parts"
WELL_COLUMNS = ("id_code", "experiment", "plate", "well", "cell_type", "well_type", "sirna")


def store_wells(sites: pd.DataFrame) -> pd.DataFrame:
    """Every well of a store's sites table (train, test, controls) in store order."""
    wells = sites.drop_duplicates("id_code")[list(WELL_COLUMNS)].reset_index(drop=True)
    wells["plate"] = wells["plate"].astype(np.int64)
    wells["sirna"] = wells["sirna"].astype(np.int64)
    return wells


def apply_labels(wells: pd.DataFrame, labels: pd.DataFrame, source: str) -> pd.DataFrame:
    """`wells` with the sirna of `labels` (id_code, sirna) filled in where it was unknown;
    an id_code not in the store, or a label that contradicts the store's, is an error."""
    pos = pd.Series(np.arange(len(wells)), index=wells["id_code"].to_numpy())
    idx = pos.reindex(labels["id_code"].to_numpy())
    unknown = labels["id_code"][idx.isna().to_numpy()]
    if len(unknown):
        raise InferError(f"{source}: {len(unknown)} id_code(s) not in the store, e.g. "
                         f"{list(unknown[:3])}; give the labels of this store's wells")
    idx = idx.to_numpy().astype(np.int64)
    new = labels["sirna"].to_numpy().astype(np.int64)
    old = wells["sirna"].to_numpy()[idx]
    clash = (old >= 0) & (old != new)
    if clash.any():
        i = int(np.flatnonzero(clash)[0])
        raise InferError(f"{source}: id_code {labels['id_code'].iloc[i]} labelled {new[i]} but "
                         f"the store says sirna {old[i]}; labels are for wells the store does "
                         "not label (the test wells)")
    out = wells.copy()
    sirna = out["sirna"].to_numpy().copy()
    sirna[idx] = new
    out["sirna"] = sirna
    return out


def write_zarr(path: str, x: np.ndarray) -> None:
    """float32 (n, d) as a zarr v3 array, whole or not at all (a directory, renamed in)."""
    import zarr

    def write(tmp):
        try:
            arr = zarr.create_array(store=tmp, shape=x.shape, dtype="float32",
                                    chunks=(min(len(x), 4096) or 1, x.shape[1]), zarr_format=3)
            arr[:] = x
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # write_atomic removes files, not folders
            raise

    write_atomic(path, write)


def write_wells(path: str, wells: pd.DataFrame) -> None:
    write_atomic(path, lambda tmp: wells[list(WELL_COLUMNS)].to_csv(tmp, index=False))


def write_meta(emb_dir: str, meta: dict) -> None:
    write_bytes(os.path.join(emb_dir, EMBED_JSON), json.dumps(meta, indent=1))


def read_meta(emb_dir: str) -> dict | None:
    path = os.path.join(emb_dir, EMBED_JSON)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise InferError(f"{path}: unreadable ({e}); embed into a new --out") from None
    if not isinstance(meta, dict):
        raise InferError(f"{path}: not an embed.json; embed into a new --out")
    return meta


def read_embeddings(emb_dir: str) -> tuple[np.ndarray, pd.DataFrame, dict]:
    """(float32 (n_wells, d), the wells table, embed.json) of a finished `infer embed`."""
    import zarr
    emb_dir = str(emb_dir)
    meta = read_meta(emb_dir)
    if meta is None or not meta.get("complete"):
        raise InferError(f"{emb_dir}: no finished embeddings ({EMBED_JSON} missing or not "
                         "complete); run `python -m infer embed --out` into it first")
    wells_path = os.path.join(emb_dir, WELLS_CSV)
    try:
        wells = pd.read_csv(wells_path, dtype={"id_code": str, "experiment": str,
                                               "cell_type": str, "well_type": str,
                                               "well": str})
    except (OSError, ValueError) as e:
        raise InferError(f"{wells_path}: unreadable ({e}); re-run infer embed") from None
    missing = [c for c in WELL_COLUMNS if c not in wells.columns]
    if missing:
        raise InferError(f"{wells_path}: columns {missing} missing; re-run infer embed")
    try:
        x = np.asarray(zarr.open_array(os.path.join(emb_dir, EMB_ZARR), mode="r")[:],
                       np.float32)
    except (OSError, ValueError, KeyError, FileNotFoundError) as e:
        raise InferError(f"{os.path.join(emb_dir, EMB_ZARR)}: unreadable ({e}); "
                         "re-run infer embed") from None
    if x.ndim != 2 or len(x) != len(wells) or len(wells) != meta.get("n_wells"):
        raise InferError(f"{emb_dir}: {EMB_ZARR} has shape {x.shape}, {WELLS_CSV} {len(wells)} "
                         f"rows, {EMBED_JSON} says {meta.get('n_wells')} wells: they come from "
                         "different runs or stores; re-run infer embed into a new --out")
    if not np.isfinite(x).all():
        raise InferError(f"{emb_dir}: {EMB_ZARR} holds NaN or inf; the run diverged?")
    bad = ~wells["sirna"].between(-1, N_SIRNAS - 1)
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise InferError(f"{wells_path}, row {i + 1}: sirna {wells['sirna'].iloc[i]} out of "
                         f"range -1..{N_SIRNAS - 1}")
    return x, wells, meta
