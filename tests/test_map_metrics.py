"""The map's parts on hand-made data: TVN on Gaussian batches, replicate mAP and relation
recall against hand-computed cases, and bad input to `infer map` (one line, exit 2)."""
from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from infer.align import align, center_scale, tvn
from infer.embeddings import EMB_ZARR, WELLS_CSV, write_meta, write_wells, write_zarr
from infer.map_metrics import cosine_similarity, relation_recall, replicate_map


def _bad_input(capsys, *args) -> str:
    from infer.__main__ import main
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(list(args))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_tvn_whitens_the_controls_and_aligns_the_batches():
    rng = np.random.default_rng(0)
    d, n = 4, 4000
    delta = np.array([1.0, -0.5, 0.0, 0.8])            # a treatment's effect, latent units
    xs, batch, ctrl, treated = [], [], [], []
    for b in range(3):
        gains = rng.uniform(0.6, 1.8, d)                 # per-feature batch gain and offset
        mix = np.eye(d) + 0.3 * rng.normal(size=(d, d))
        a = mix * gains
        mu = rng.normal(0, 2, d)
        c = mu + rng.normal(size=(n, d)) @ a.T
        t = mu + (rng.normal(size=(n, d)) + delta) @ a.T
        xs += [c, t]
        batch += [b] * 2 * n
        ctrl += [True] * n + [False] * n
        treated.append(t.mean(0) - c.mean(0))
    x, batch, ctrl = np.concatenate(xs), np.asarray(batch), np.asarray(ctrl)
    before = [np.linalg.norm(v) for v in treated]
    assert max(before) / min(before) > 1.3             # the batches disagree before
    z = tvn(x, batch, ctrl)
    pooled = np.cov(z[ctrl], rowvar=False)
    assert np.allclose(pooled, np.eye(d), atol=0.08)
    shifts = []
    for b in range(3):
        zc = z[(batch == b) & ctrl]
        assert np.allclose(zc.mean(0), 0, atol=1e-9)
        assert np.allclose(np.cov(zc, rowvar=False), np.eye(d), atol=0.08)
        shifts.append(z[(batch == b) & ~ctrl].mean(0))
    # each batch's controls are the identity: a treatment is as far from them everywhere,
    # its length in latent units
    lengths = np.linalg.norm(shifts, axis=1)
    assert np.allclose(lengths, np.linalg.norm(delta), rtol=0.08), lengths


def test_center_scale_standardizes_each_plate_on_its_controls():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(3, 2, (50, 3)), rng.normal(-1, 0.5, (50, 3))])
    batch = np.repeat(["p1", "p2"], 50)
    ctrl = np.tile(np.arange(50) < 20, 2)
    z = center_scale(x, batch, ctrl)
    for b in ("p1", "p2"):
        zc = z[(batch == b) & ctrl]
        assert np.allclose(zc.mean(0), 0) and np.allclose(zc.std(0), 1)


def _four_wells(angles_deg, cell_types=("A",) * 4):
    a = np.deg2rad(np.asarray(angles_deg, float))
    x = np.stack([np.cos(a), np.sin(a)], 1)
    wells = pd.DataFrame({"sirna": [1, 2, 1, 2], "experiment": ["e1", "e1", "e2", "e2"],
                          "cell_type": list(cell_types), "well_type": "treatment"})
    return x, wells


def test_replicate_map_matches_a_hand_computed_case():
    # sirna 1 at 0 and 30 degrees, sirna 2 at 10 and 90, experiments e1 / e2.
    # Ranks (positive = same siRNA in the other experiment, negatives = other siRNA):
    #   1@0: 2@10, 1@30, 2@90 -> AP 1/2;  1@30: 2@10, 1@0 -> 1/2
    #   2@10: 1@0, 1@30, 2@90 -> 1/3;     2@90: 1@30, 2@10 -> 1/2
    x, wells = _four_wells([0, 10, 30, 90])
    res = replicate_map(x, wells, null_size=200)
    within = res["within_cell_type"]
    assert within["n"] == 2
    assert within["mean_map"] == pytest.approx((0.5 + (1 / 3 + 1 / 2) / 2) / 2)
    assert within["chance"] == pytest.approx(1 / 3)
    assert res["across_cell_types"]["mean_map"] is None    # one cell type: no pairs
    # perfect replicates across cell types
    x, wells = _four_wells([0, 90, 5, 95], cell_types=("A", "A", "B", "B"))
    assert replicate_map(x, wells, null_size=200)["across_cell_types"]["mean_map"] == 1.0


def test_relation_recall_matches_a_hand_computed_case():
    sirnas = [10, 11, 12, 13, 14]
    sim = np.eye(5)
    iu = np.triu_indices(5, 1)
    sim[iu] = np.arange(1, 11) / 10                       # pair k has similarity k/10
    sim = np.triu(sim) + np.triu(sim, 1).T
    pairs = list(zip(*iu))
    top, bottom, mid = pairs[9], pairs[0], pairs[4]
    rel = pd.DataFrame([(sirnas[a], sirnas[b]) for a, b in (top, bottom, mid)],
                       columns=["sirna_a", "sirna_b"])
    r = relation_recall(sim, sirnas, rel, tail=0.1)
    assert r["recall"] == pytest.approx(2 / 3)
    assert r["recall_top"] == pytest.approx(1 / 3) and r["recall_bottom"] == pytest.approx(1 / 3)
    assert r["chance"] == pytest.approx(0.2)


def test_cosine_similarity_is_cosine():
    s = cosine_similarity(np.array([[1.0, 0], [1, 1], [-2, 0]]))
    assert s[0, 1] == pytest.approx(2 ** -0.5) and s[0, 2] == pytest.approx(-1)


def _fake_embeddings(root, n_exp=3, controls=True, n_sirnas=4):
    """A finished embed directory: n_exp experiments of one cell type, every siRNA once
    per experiment (+ 3 control wells per plate when `controls`)."""
    rng = np.random.default_rng(0)
    rows = []
    for e in range(n_exp):
        for s in range(n_sirnas):
            rows.append((f"HUVEC-0{e + 1}_1_B0{s + 2}", f"HUVEC-0{e + 1}", 1, f"B0{s + 2}",
                         "HUVEC", "treatment", s))
        for c in range(3 if controls else 0):
            rows.append((f"HUVEC-0{e + 1}_1_C0{c + 2}", f"HUVEC-0{e + 1}", 1, f"C0{c + 2}",
                         "HUVEC", "positive_control", 1108 + c))
    wells = pd.DataFrame(rows, columns=["id_code", "experiment", "plate", "well", "cell_type",
                                        "well_type", "sirna"])
    x = rng.normal(size=(len(wells), 5)).astype(np.float32)
    os.makedirs(root, exist_ok=True)
    write_zarr(os.path.join(root, EMB_ZARR), x)
    write_wells(os.path.join(root, WELLS_CSV), wells)
    write_meta(str(root), dict(n_wells=len(wells), complete=True))
    return x, wells


def test_map_writes_profiles_metrics_and_table(tmp_path):
    from infer.map import phenomic_map
    x, wells = _fake_embeddings(tmp_path / "emb")
    pd.DataFrame({"sirna_a": [0], "sirna_b": [1]}).to_csv(tmp_path / "rel.csv", index=False)
    phenomic_map(str(tmp_path / "emb"), str(tmp_path / "map"), relations=str(tmp_path / "rel.csv"),
                 null_size=200, figures=False)
    m = json.loads((tmp_path / "map" / "metrics.json").read_text())
    assert set(m["alignments"]) == {"none", "center_scale", "tvn"}
    prof = pd.read_csv(tmp_path / "map" / "none" / "profiles.csv")
    assert len(prof) == 8 and set(prof.cell_type) == {"HUVEC", "all"}
    vec = np.load(tmp_path / "map" / "none" / "profiles.npy")
    treat = wells.well_type.eq("treatment").to_numpy() & wells.sirna.eq(2).to_numpy()
    row = prof.index[(prof.sirna == 2) & (prof.cell_type == "all")][0]
    assert np.allclose(vec[row], x[treat].mean(0), atol=1e-6)
    sim = np.load(tmp_path / "map" / "tvn" / "similarity.npy")
    assert sim.shape == (4, 4) and np.allclose(np.diag(sim), 1, atol=1e-5)
    assert "| tvn |" in (tmp_path / "map" / "metrics.md").read_text()
    assert np.allclose(np.load(tmp_path / "map" / "none" / "aligned.npy"), x)
    assert np.allclose(align(x, wells, "none"), x)


def test_relations_naming_unknown_sirnas_are_one_line(tmp_path, capsys):
    _fake_embeddings(tmp_path / "emb")
    rel = tmp_path / "rel.csv"
    pd.DataFrame({"sirna_a": [0, 1], "sirna_b": [1, 77]}).to_csv(rel, index=False)
    err = _bad_input(capsys, "map", "--embeddings", str(tmp_path / "emb"), "--out",
                     str(tmp_path / "map"), "--relations", str(rel))
    assert "rel.csv, row 2" in err and "77" in err
    assert not (tmp_path / "map").exists()


def test_an_empty_control_set_is_one_line(tmp_path, capsys):
    _fake_embeddings(tmp_path / "emb", controls=False)
    err = _bad_input(capsys, "map", "--embeddings", str(tmp_path / "emb"), "--out",
                     str(tmp_path / "map"), "--alignments", "tvn")
    assert "no control wells" in err


def test_embeddings_that_disagree_with_their_wells_are_one_line(tmp_path, capsys):
    x, wells = _fake_embeddings(tmp_path / "emb")
    write_wells(str(tmp_path / "emb" / WELLS_CSV), wells.iloc[:-1])
    err = _bad_input(capsys, "map", "--embeddings", str(tmp_path / "emb"), "--out",
                     str(tmp_path / "map"))
    assert "wells.csv" in err and "different runs or stores" in err


def test_labels_fill_the_unknown_test_wells_and_refuse_strangers():
    from infer import InferError
    from infer.embeddings import apply_labels
    wells = pd.DataFrame({"id_code": ["a", "b", "c"], "sirna": [5, -1, -1]})
    out = apply_labels(wells, pd.DataFrame({"id_code": ["c", "b"], "sirna": [7, 8]}), "sub.csv")
    assert list(out["sirna"]) == [5, 8, 7] and list(wells["sirna"]) == [5, -1, -1]
    with pytest.raises(InferError, match="sub.csv: 1 id_code.*'z'"):
        apply_labels(wells, pd.DataFrame({"id_code": ["z"], "sirna": [1]}), "sub.csv")
    with pytest.raises(InferError, match="id_code a labelled 6 but the store says sirna 5"):
        apply_labels(wells, pd.DataFrame({"id_code": ["a"], "sirna": [6]}), "sub.csv")
