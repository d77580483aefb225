"""Batch alignment of well embeddings on their control wells: none, center_scale, tvn.

The reference wells are the controls (positive and negative): RxRx1 has one negative
control per plate, too few to estimate a spread from, and the same 30 positive controls
on every plate, so together they see each batch as it is.

- center_scale: per plate, subtract its controls' mean and divide by their std.
- tvn (typical variation normalization): centre on the controls and whiten with their
  PCA (so the controls' covariance is the identity), then per experiment centre on its
  controls and map its control covariance to the identity (CORAL: C_e^(-1/2)). C_e is
  shrunk toward the identity by d / (n + d) (n controls in d dimensions), since an
  experiment has fewer controls than the embedding has dimensions.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from infer import InferError

ALIGNMENTS = ("none", "center_scale", "tvn")
EPS = 1e-6


def align(x: np.ndarray, wells: pd.DataFrame, method: str) -> np.ndarray:
    """x (n_wells, d) aligned by `method`; wells gives experiment, plate and well_type."""
    if method not in ALIGNMENTS:
        raise InferError(f"--alignments: {method!r} is none of {', '.join(ALIGNMENTS)}")
    x = np.asarray(x, np.float64)
    if method == "none":
        return x.astype(np.float32)
    ctrl = control_mask(wells)
    if method == "center_scale":
        batch = wells["experiment"].astype(str) + "_" + wells["plate"].astype(str)
        return center_scale(x, batch.to_numpy(), ctrl).astype(np.float32)
    return tvn(x, wells["experiment"].astype(str).to_numpy(), ctrl).astype(np.float32)


def control_mask(wells: pd.DataFrame) -> np.ndarray:
    ctrl = (wells["well_type"] != "treatment").to_numpy()
    if not ctrl.any():
        raise InferError("wells.csv: no control wells (well_type negative_control or "
                         "positive_control); alignment fits on them: embed a store with its "
                         "controls, or use --alignments none")
    return ctrl


def center_scale(x: np.ndarray, batch: np.ndarray, ctrl: np.ndarray) -> np.ndarray:
    """Per batch (plate), (x - mean) / std of its control wells.

    A plate's few controls can agree by chance on a feature (or a ReLU feature be 0 in all
    of them): the std is floored at a tenth of the mean control spread, lest it explode."""
    out = np.empty_like(x)
    floor = max(0.1 * float(x[ctrl].std(0).mean()), EPS)
    for b in pd.unique(batch):
        rows = batch == b
        ref = x[rows & ctrl]
        if len(ref) < 2:
            raise InferError(f"wells.csv: plate {b} has {len(ref)} control well(s); "
                             "center_scale needs at least 2 per plate")
        out[rows] = (x[rows] - ref.mean(0)) / np.maximum(ref.std(0), floor)
    return out


def whitener(ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, W) with (ref - mean) @ W of identity covariance (PCA whitening on the
    components ref spans; the rest, noise of a rank-deficient estimate, are dropped)."""
    mu = ref.mean(0)
    vals, vecs = np.linalg.eigh(np.cov(ref - mu, rowvar=False).reshape(ref.shape[1], -1))
    keep = vals > max(vals.max(), EPS) * 1e-6
    return mu, vecs[:, keep] / np.sqrt(vals[keep])


def inverse_sqrt(c: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh(c)
    return (vecs / np.sqrt(np.maximum(vals, EPS))) @ vecs.T


def tvn(x: np.ndarray, batch: np.ndarray, ctrl: np.ndarray) -> np.ndarray:
    """Whiten on all controls, then CORAL each batch's controls onto the identity."""
    if ctrl.sum() < 3:
        raise InferError(f"wells.csv: {int(ctrl.sum())} control well(s); tvn needs at least 3")
    mu, w = whitener(x[ctrl])
    z = (x - mu) @ w
    d = z.shape[1]
    out = np.empty_like(z)
    for b in pd.unique(batch):
        rows = batch == b
        ref = z[rows & ctrl]
        if len(ref) < 2:
            raise InferError(f"wells.csv: experiment {b} has {len(ref)} control well(s); tvn "
                             "needs at least 2 per experiment")
        n = len(ref)
        shrink = d / (n + d)
        cov = np.cov(ref, rowvar=False).reshape(d, d)
        cov = (1 - shrink) * cov + shrink * np.trace(cov) / d * np.eye(d)
        out[rows] = (z[rows] - ref.mean(0)) @ inverse_sqrt(cov)
    return out
