"""How good a map is: replicate mAP (copairs), batch leakage, recall of known relations.

- replicate consistency: every treatment well retrieves the wells of its siRNA in other
  experiments (within its cell type, or in other cell types) among wells of other siRNAs,
  by cosine similarity; copairs gives the AP per well, the mAP per siRNA, a permutation
  p-value and its Benjamini-Hochberg correction (significant: corrected p < 0.05).
- batch leakage: every control well retrieves the other controls of its own experiment
  (other siRNAs: batch, not biology) among the controls of the other experiments of its
  cell type; mAP over experiments, lower is better, `chance` is what no batch effect gives.
- known relations: the fraction of related siRNA pairs whose profile similarity lies in
  the top or the bottom 5 % of all pairs (EFAAR's benchmark); chance is 0.10.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from infer import InferError

FDR = 0.05
TAIL = 0.05  # each tail of the similarity distribution a relation is looked for in

# (positives: same / different, negatives: same / different, mAP per)
REPLICATE_PAIRS = {
    "within_cell_type": (["sirna", "cell_type"], ["experiment"], ["cell_type"], ["sirna"],
                         ["sirna", "cell_type"]),
    "across_cell_types": (["sirna"], ["cell_type"], [], ["sirna"], ["sirna"]),
}


def _copairs_map(meta: pd.DataFrame, x: np.ndarray, pairs, null_size: int, seed: int):
    """(per-well AP frame, per-group mAP frame) from copairs, or None when no pair exists."""
    from copairs.map import average_precision, mean_average_precision
    from copairs.matching import UnpairedException
    logging.getLogger("copairs").setLevel(logging.WARNING)
    pos_same, pos_diff, neg_same, neg_diff, per = pairs
    try:
        ap = average_precision(meta.reset_index(drop=True), np.asarray(x, np.float64),
                               pos_sameby=pos_same, pos_diffby=pos_diff, neg_sameby=neg_same,
                               neg_diffby=neg_diff, distance="cosine", progress_bar=False)
    except UnpairedException:
        return None
    ap = ap.dropna(subset=["average_precision"])
    ap = ap[ap["n_pos_pairs"] > 0]
    if ap.empty:
        return None
    maps = mean_average_precision(ap, per, null_size=null_size, threshold=FDR, seed=seed,
                                  progress_bar=False)
    return ap, maps


def replicate_map(x: np.ndarray, wells: pd.DataFrame, null_size: int = 10000,
                  seed: int = 0) -> dict:
    """Replicate mAP of labelled treatment wells, within and across cell types."""
    keep = ((wells["well_type"] == "treatment") & (wells["sirna"] >= 0)).to_numpy()
    meta = wells.loc[keep, ["sirna", "cell_type", "experiment"]].reset_index(drop=True)
    out = {}
    for name, pairs in REPLICATE_PAIRS.items():
        res = _copairs_map(meta, x[keep], pairs, null_size, seed)
        if res is None:
            out[name] = dict(mean_map=None, fraction_significant=None, n=0)
            continue
        ap, maps = res
        out[name] = dict(mean_map=float(maps["mean_average_precision"].mean()),
                         fraction_significant=float(maps["below_corrected_p"].mean()),
                         chance=float((ap["n_pos_pairs"] / ap["n_total_pairs"]).mean()),
                         n=int(len(maps)))
    return out


def batch_leakage(x: np.ndarray, wells: pd.DataFrame, null_size: int = 1000,
                  seed: int = 0) -> dict:
    """mAP of control wells retrieving their own experiment (lower is better)."""
    keep = (wells["well_type"] != "treatment").to_numpy()
    meta = wells.loc[keep, ["sirna", "cell_type", "experiment"]].reset_index(drop=True)
    pairs = (["experiment"], ["sirna"], ["cell_type"], ["experiment"], ["experiment"])
    res = _copairs_map(meta, x[keep], pairs, null_size, seed)
    if res is None:
        return dict(mean_map=None, chance=None, n=0)
    ap, maps = res
    return dict(mean_map=float(maps["mean_average_precision"].mean()),
                chance=float((ap["n_pos_pairs"] / ap["n_total_pairs"]).mean()),
                n=int(len(maps)))


def cosine_similarity(profiles: np.ndarray) -> np.ndarray:
    p = np.asarray(profiles, np.float64)
    unit = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
    return unit @ unit.T


def relation_recall(sim: np.ndarray, sirnas, relations: pd.DataFrame, tail: float = TAIL) -> dict:
    """Recall of `relations` (sirna_a, sirna_b) among the top and the bottom `tail` of the
    off-diagonal similarities of `sim` (rows and columns: `sirnas`)."""
    index = {int(s): i for i, s in enumerate(sirnas)}
    a = np.array([index[int(s)] for s in relations["sirna_a"]], np.int64)
    b = np.array([index[int(s)] for s in relations["sirna_b"]], np.int64)
    iu = np.triu_indices(len(sim), 1)
    values = sim[iu]
    hi, lo = np.quantile(values, 1 - tail), np.quantile(values, tail)
    rel = sim[a, b]
    top, bottom = rel >= hi, rel <= lo
    return dict(recall=float(np.mean(top | bottom)), recall_top=float(np.mean(top)),
                recall_bottom=float(np.mean(bottom)), chance=2 * tail, pairs=int(len(rel)),
                threshold_top=float(hi), threshold_bottom=float(lo))


def check_relations(relations: pd.DataFrame, known, path: str) -> pd.DataFrame:
    """Relations as int pairs of siRNAs that have a profile; one line naming the row else."""
    for c in ("sirna_a", "sirna_b"):
        if c not in relations.columns:
            raise InferError(f"{path}: no column {c}; expected sirna_a,sirna_b[,family]")
    out = relations.copy()
    known = set(int(s) for s in known)
    for c in ("sirna_a", "sirna_b"):
        v = pd.to_numeric(out[c], errors="coerce")
        bad = v.isna() | (v != v.round()) | ~v.isin(known)
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise InferError(f"{path}, row {i + 1}: {c} {out[c].iloc[i]!r} is not a siRNA of "
                             f"the map ({len(known)} labelled treatment siRNAs); relations "
                             "must name siRNAs the embeddings have")
        out[c] = v.astype(np.int64)
    same = out["sirna_a"] == out["sirna_b"]
    if same.any():
        i = int(np.flatnonzero(same.to_numpy())[0])
        raise InferError(f"{path}, row {i + 1}: a siRNA related to itself")
    if out.empty:
        raise InferError(f"{path}: no relations (a header and no rows)")
    return out
