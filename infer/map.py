"""map: `infer embed`'s wells -> aligned, aggregated, related (EFAAR) and scored, per alignment.

    MAP/<alignment>/aligned.npy       float32 (n_wells, d), rows as EMB/wells.csv
    MAP/<alignment>/profiles.csv/.npy one profile per siRNA x cell type and per siRNA
                                      (cell_type `all`): the mean of its aligned wells
    MAP/<alignment>/similarity.npy    cosine similarity of the per-siRNA profiles, rows and
                                      columns as similarity_sirnas.csv
    MAP/metrics.json, MAP/metrics.md  the benchmark (infer.map_metrics) per alignment
    MAP/similarity.png, MAP/projection.png

Profiles and metrics use the treatment wells with a known siRNA (test wells need
`infer embed --labels`); the controls serve the alignment and the leakage score.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd

from common.arglists import parse_names
from infer import InferError
from infer.align import ALIGNMENTS, align
from infer.embeddings import read_embeddings
from infer.map_metrics import (batch_leakage, check_relations, cosine_similarity,
                               relation_recall, replicate_map)
from shards.atomic import write_atomic, write_bytes
from shards.metadata import read_csv_checked

ALL_CELL_TYPES = "all"


def profiles_of(x: np.ndarray, wells: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """Mean aligned embedding per siRNA x cell type, then per siRNA (cell_type `all`)."""
    keep = ((wells["well_type"] == "treatment") & (wells["sirna"] >= 0)).to_numpy()
    w = wells.loc[keep, ["sirna", "cell_type"]].reset_index(drop=True)
    xs = x[keep]
    rows, vecs = [], []
    for key, cols in ((["sirna", "cell_type"], None), (["sirna"], ALL_CELL_TYPES)):
        for k, idx in w.groupby(key, sort=True).indices.items():
            k = k if isinstance(k, tuple) else (k,)
            rows.append((int(k[0]), k[1] if cols is None else cols, len(idx)))
            vecs.append(xs[idx].mean(0))
    table = pd.DataFrame(rows, columns=["sirna", "cell_type", "n_wells"])
    return table, np.asarray(vecs, np.float32).reshape(len(rows), x.shape[1])


def phenomic_map(embeddings, out, relations=None, alignments="none,center_scale,tvn",
                 null_size=10000, seed=0, figures=True) -> dict:
    methods = parse_names(alignments, "--alignments") or list(ALIGNMENTS)
    for m in methods:
        if m not in ALIGNMENTS:
            raise InferError(f"--alignments: {m!r} is none of {', '.join(ALIGNMENTS)}")
    if isinstance(null_size, bool) or not isinstance(null_size, int) or null_size < 100:
        raise InferError(f"--null-size {null_size!r}: need an integer >= 100")
    x, wells, meta = read_embeddings(str(embeddings))
    labelled = (wells["well_type"] == "treatment") & (wells["sirna"] >= 0)
    if labelled.sum() < 2:
        raise InferError(f"{embeddings}: {int(labelled.sum())} treatment well(s) with a siRNA; "
                         "a map needs them (test wells get theirs from infer embed --labels)")
    rel = None
    if relations is not None:
        rel = check_relations(read_csv_checked(str(relations), ("sirna_a", "sirna_b")),
                              wells.loc[labelled, "sirna"].unique(), str(relations))
    out = str(out)
    os.makedirs(out, exist_ok=True)

    results, aligned = {}, {}
    for m in methods:
        xa = align(x, wells, m)
        aligned[m] = xa
        table, prof = profiles_of(xa, wells)
        per = (table["cell_type"] == ALL_CELL_TYPES).to_numpy()
        sim = cosine_similarity(prof[per])
        sirnas = table.loc[per, "sirna"].to_numpy()
        _write_alignment(os.path.join(out, m), xa, table, prof, sim, sirnas)
        r = dict(replicate=replicate_map(xa, wells, null_size, seed),
                 batch_leakage=batch_leakage(xa, wells, min(null_size, 1000), seed))
        if rel is not None:
            r["relations"] = relation_recall(sim, sirnas, rel)
        results[m] = r
        if m == methods[-1]:
            last = (sim, sirnas)

    summary = dict(embeddings=os.path.abspath(str(embeddings)), checkpoint=meta.get("checkpoint"),
                   wells=len(wells), labelled_wells=int(labelled.sum()),
                   controls=int((wells["well_type"] != "treatment").sum()),
                   sirnas=int(wells.loc[labelled, "sirna"].nunique()), dim=int(x.shape[1]),
                   relations=None if relations is None else os.path.abspath(str(relations)),
                   null_size=null_size, seed=seed, alignments=results)
    write_bytes(os.path.join(out, "metrics.json"), json.dumps(summary, indent=1))
    table_md = metrics_table(results)
    write_bytes(os.path.join(out, "metrics.md"), table_md)
    if figures:
        from infer.map_figures import projection_figure, similarity_figure
        similarity_figure(*last, rel, os.path.join(out, "similarity.png"), methods[-1])
        projection_figure(aligned, wells, os.path.join(out, "projection.png"))
    print(table_md)
    return dict(out=out, alignments=methods)


def _write_alignment(d: str, xa, table, prof, sim, sirnas) -> None:
    os.makedirs(d, exist_ok=True)
    write_atomic(os.path.join(d, "aligned.npy"), lambda t: np.save(t, xa))
    write_atomic(os.path.join(d, "profiles.npy"), lambda t: np.save(t, prof))
    write_atomic(os.path.join(d, "profiles.csv"), lambda t: table.to_csv(t, index=False))
    write_atomic(os.path.join(d, "similarity.npy"), lambda t: np.save(t, sim.astype(np.float32)))
    write_atomic(os.path.join(d, "similarity_sirnas.csv"),
                 lambda t: pd.DataFrame({"sirna": sirnas}).to_csv(t, index=False))


def _f(v, digits=3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def metrics_table(results: dict) -> str:
    """Markdown: one row per alignment, the three benchmarks side by side."""
    has_rel = any("relations" in r for r in results.values())
    head = ["alignment", "replicate mAP within cell type (signif.)",
            "replicate mAP across cell types (signif.)", "batch leakage ↓ (chance)"]
    if has_rel:
        head += ["relation recall top/bottom 5 % (chance 0.10)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for m, r in results.items():
        w, a, b = (r["replicate"]["within_cell_type"], r["replicate"]["across_cell_types"],
                   r["batch_leakage"])
        row = [m, f"{_f(w['mean_map'])} ({_f(w['fraction_significant'], 2)})",
               f"{_f(a['mean_map'])} ({_f(a['fraction_significant'], 2)})",
               f"{_f(b['mean_map'])} ({_f(b['chance'])})"]
        if has_rel:
            rr = r.get("relations")
            row += ["–" if rr is None else
                    f"{_f(rr['recall'], 2)} ({_f(rr['recall_top'], 2)} / "
                    f"{_f(rr['recall_bottom'], 2)})"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
