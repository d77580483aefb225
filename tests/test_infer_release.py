"""Inference on the release layout (metadata.csv, no test.csv / sample_submission.csv) and
`score` against its public test labels: planted logits in a fake layout, both layouts of
the same wells side by side. The trained end-to-end run is in test_infer_predict."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from infer.__main__ import main
from infer_fakes import make_dataset, planted_logits, write_pred

MODEL = "se_resnext50_32x4d"


def cli(*args):
    return main([str(a) for a in args])


def bad_input(capsys, *args) -> str:
    """The one stderr line of a command that must fail with exit status 2."""
    with pytest.raises(SystemExit) as e:
        cli(*args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture
def pair(tmp_path):
    """The same wells in both layouts (test wells shuffled: the source order is not sorted),
    and one predict root of three runs (one stored in shuffled row order)."""
    kaggle, release = tmp_path / "kaggle", tmp_path / "release"
    info = make_dataset(kaggle, group_size=10, shuffle_test_csv=True)
    make_dataset(release, group_size=10, shuffle_test_csv=True, layout="release")
    # the tests below prove the release path only if nothing of the Kaggle layout is there
    assert os.listdir(release) == ["metadata.csv"]
    test = info["test"]
    truth = test["sirna"].to_numpy()
    pred = tmp_path / "pred"
    for i, (ch, fold) in enumerate([("[1,2,3,4,5]", 0), ("[1,2,3,4,6]", 0), ("[1,2,3,5,6]", 1)]):
        write_pred(pred, ch, fold, MODEL, planted_logits(truth, signal=2.5, seed=11 + i),
                   test["id_code"], shuffle_seed=7 if i == 1 else None)
    return dict(kaggle=kaggle, release=release, test=test, truth=truth, pred=pred, tmp=tmp_path)


def test_ensemble_on_the_release_layout_equals_the_kaggle_one(pair):
    out = {}
    for name in ("kaggle", "release"):
        out[name] = pair["tmp"] / f"sub_{name}" / "submission.csv"
        cli("ensemble", "--data-dir", pair[name], "--predict-root", pair["pred"], "--out", out[name])
    k, r = (pd.read_csv(out[n]) for n in ("kaggle", "release"))
    # without sample_submission.csv the rows follow metadata.csv's test wells (site-1 rows)
    meta = pd.read_csv(pair["release"] / "metadata.csv")
    order = meta[(meta["dataset"] == "test") & (meta["well_type"] == "treatment")
                 & (meta["site"] == 1)]["well_id"].tolist()
    assert r["id_code"].tolist() == order == pair["test"]["id_code"].tolist()
    assert k.set_index("id_code").loc[order, "sirna"].tolist() == r["sirna"].tolist()
    np.testing.assert_array_equal(
        np.load(str(out["kaggle"])[:-4] + ".probs.npy"), np.load(str(out["release"])[:-4] + ".probs.npy"))
    assert (pd.read_csv(str(out["release"])[:-4] + ".plates.csv")["ambiguous"] == False).all()  # noqa: E712


def test_pseudo_labels_on_the_release_layout_equal_the_kaggle_ones(pair):
    from prep.folds import write_folds

    got = {}
    for name in ("kaggle", "release"):
        folds = pair["tmp"] / f"csv_{name}"
        write_folds(str(pair[name]), n_folds=2, out_dir=str(folds))
        cli("pseudo-labels", "--data-dir", pair[name], "--predict-root", pair["pred"],
            "--folds-dir", folds, "--out-dir", folds / "pseudo", "--min-confidence", 0.3)
        got[name] = {f: (folds / "pseudo" / f).read_bytes()
                     for f in sorted(os.listdir(folds / "pseudo"))}
    assert "train_0.csv" in got["release"] and "pseudo_test.csv" in got["release"]
    assert len(pd.read_csv(pair["tmp"] / "csv_release" / "pseudo" / "pseudo_test.csv")) > 0
    assert got["release"] == got["kaggle"]


def _hand_scores(wells: pd.DataFrame, truth, pred) -> dict:
    ok = np.asarray(pred) == np.asarray(truth)
    return dict(all=ok.mean(),
                cell={c: ok[(wells["cell_type"] == c).to_numpy()].mean()
                      for c in wells["cell_type"].unique()},
                exp={e: ok[(wells["experiment"] == e).to_numpy()].mean()
                     for e in wells["experiment"].unique()})


def test_score_a_submission_against_metadata_csv(pair, capsys):
    s = pair
    out = s["tmp"] / "submission.csv"
    cli("ensemble", "--data-dir", s["release"], "--predict-root", s["pred"], "--out", out)
    sub = pd.read_csv(out).set_index("id_code").loc[s["test"]["id_code"], "sirna"].to_numpy()
    probs = np.load(str(out)[:-4] + ".probs.npy")
    want = _hand_scores(s["test"], s["truth"], sub)
    want_argmax = _hand_scores(s["test"], s["truth"], probs[:, :1108].argmax(1))
    capsys.readouterr()
    for truth in (s["release"] / "metadata.csv", s["release"], s["kaggle"] / "test_truth.csv"):
        res = cli("score", "--submission", out, "--truth", truth)
        assert res["all"]["n"] == len(s["test"])
        assert res["all"]["submission"] == pytest.approx(want["all"])
        assert res["all"]["argmax (no assignment)"] == pytest.approx(want_argmax["all"])
        assert set(res) == {"all", "HEPG2", "HUVEC", "U2OS", "experiments"}
        for c, v in want["cell"].items():
            assert res[c]["submission"] == pytest.approx(v)
        assert set(res["experiments"]) == set(want["exp"])
        for e, v in want["exp"].items():
            assert res["experiments"][e]["submission"] == pytest.approx(v)
            assert res["experiments"][e]["n"] == int((s["test"]["experiment"] == e).sum())
    printed = capsys.readouterr().out
    assert "metadata.csv" in printed and "HUVEC-02" in printed and "experiment" in printed
    # the plate assignment helps on planted logits (it is what the ensemble is for)
    assert want["all"] > want_argmax["all"]


def test_score_a_predict_root_against_metadata_csv(pair, capsys):
    from infer.ensemble import build

    s = pair
    res = cli("score", "--predict-root", s["pred"], "--split", "test",
              "--truth", s["release"] / "metadata.csv")
    printed = capsys.readouterr().out
    names = [k for k in res]
    assert len(names) == 4 and names[-1] == "ensemble (3 files)"
    ens, _ = build(s["release"], s["pred"], quiet=True)
    ids = ens.wells["id_code"].tolist()
    assert ids == s["test"]["id_code"].tolist()
    top = res["ensemble (3 files)"]
    assert top["all"]["top1"] == pytest.approx(np.mean(ens.argmax == s["truth"]))
    assert top["all"]["top1_assigned"] == pytest.approx(np.mean(ens.assigned == s["truth"]))
    assert top["all"]["top1_assigned"] > top["all"]["top1"]
    hand = _hand_scores(s["test"], s["truth"], ens.assigned)
    for e, v in hand["exp"].items():
        assert top["experiments"][e]["top1_assigned"] == pytest.approx(v)
    for c, v in hand["cell"].items():
        assert top[c]["top1_assigned"] == pytest.approx(v)
    # every single run scored on its own, with and without the assignment
    for name in names[:-1]:
        assert 0 < res[name]["all"]["top1"] <= res[name]["all"]["top1_assigned"] <= 1
    assert "ensemble (3 files)" in printed and "top1_assigned" in printed

    # the Kaggle layout with the synthetic test_truth.csv: the same figures
    again = cli("score", "--predict-root", s["pred"], "--split", "test",
                "--truth", s["kaggle"] / "test_truth.csv")
    assert again == res
    # a truth file outside the data directory, with --data-dir
    elsewhere = s["tmp"] / "labels.csv"
    pd.read_csv(s["kaggle"] / "test_truth.csv").to_csv(elsewhere, index=False)
    assert cli("score", "--predict-root", s["pred"], "--split", "test", "--truth", elsewhere,
               "--data-dir", s["release"]) == res


def test_plate_group_errors_name_metadata_csv(tmp_path):
    from shards.plate_groups import GroupError, load_train_groups

    make_dataset(tmp_path, group_size=4, layout="release")
    meta = pd.read_csv(tmp_path / "metadata.csv")
    # train holds controls only: no siRNA group can be derived, and the message says from what
    meta[(meta["dataset"] == "test") | (meta["well_type"] != "treatment")].to_csv(
        tmp_path / "metadata.csv", index=False)
    with pytest.raises(GroupError, match=r"metadata.csv: no labelled treatment wells"):
        load_train_groups(tmp_path)


# ------------------------------------------------------------------ malformed and edge cases

def _sub(pair, rows=None):
    sub = pair["test"][["id_code", "sirna"]]
    if rows is not None:
        sub = pd.concat([sub, pd.DataFrame(rows, columns=["id_code", "sirna"])])
    path = pair["tmp"] / "sub.csv"
    sub.to_csv(path, index=False)
    return path


def test_truth_without_the_submissions_ids_is_one_line(pair, capsys):
    sub = _sub(pair, [("RPE-09_4_O23", 3)])
    line = bad_input(capsys, "score", "--submission", sub, "--truth", pair["release"])
    assert "sub.csv: 1 id_code(s) not in" in line and "metadata.csv" in line
    assert "RPE-09_4_O23" in line


def test_truth_of_another_data_set_for_a_predict_root_is_one_line(pair, tmp_path, capsys):
    other = tmp_path / "other"
    make_dataset(other, group_size=10, seed=3, layout="release")
    line = bad_input(capsys, "score", "--predict-root", pair["pred"], "--split", "test",
                     "--truth", other / "metadata.csv", "--data-dir", pair["release"])
    assert "other/metadata.csv: no label for" in line and "test wells of" in line


def test_a_submission_missing_wells_counts_them_wrong(pair, capsys):
    sub = pair["test"][["id_code", "sirna"]].iloc[:-5]
    sub.to_csv(pair["tmp"] / "part.csv", index=False)
    res = cli("score", "--submission", pair["tmp"] / "part.csv", "--truth", pair["release"])
    n = len(pair["test"])
    assert res["all"] == {"n": n, "submission": pytest.approx((n - 5) / n)}
    assert "WARNING: 5 well(s) of" in capsys.readouterr().out


@pytest.mark.parametrize("case, needle", [
    ("no labels dir", "no test labels here; looked for metadata.csv"),
    ("missing file", "nope.csv: truth file not found"),
    ("metadata without sirna_id", "metadata.csv: missing column"),
    ("metadata with one site", "has no site 2 row; every well needs both sites"),
    ("metadata without test wells", "no test wells of type treatment"),
    ("empty metadata", "metadata.csv: file is empty"),
])
def test_malformed_truth_is_one_line(pair, tmp_path, capsys, case, needle):
    sub = _sub(pair)
    bad = tmp_path / "bad"
    bad.mkdir()
    meta = pd.read_csv(pair["release"] / "metadata.csv")
    truth = bad / "metadata.csv"
    if case == "no labels dir":
        truth = pair["tmp"] / "empty_dir"
        truth.mkdir()
    elif case == "missing file":
        truth = bad / "nope.csv"
    elif case == "metadata without sirna_id":
        meta.drop(columns="sirna_id").to_csv(truth, index=False)
    elif case == "metadata with one site":
        meta[meta["site"] == 1].to_csv(truth, index=False)
    elif case == "metadata without test wells":
        meta[meta["dataset"] == "train"].to_csv(truth, index=False)
    else:
        truth.write_text("")
    line = bad_input(capsys, "score", "--submission", sub, "--truth", truth)
    assert needle in line


def test_a_kaggle_data_dir_has_no_test_labels(pair, capsys):
    os.remove(pair["kaggle"] / "test_truth.csv")
    line = bad_input(capsys, "score", "--submission", _sub(pair), "--truth", pair["kaggle"])
    assert "no test labels here" in line and "Kaggle" in line


@pytest.mark.parametrize("args, needle", [
    (["--split", "test"], "--split test needs --truth"),
    (["--split", "train"], "--split 'train': choose valid"),
])
def test_predict_root_options(pair, capsys, args, needle):
    assert needle in bad_input(capsys, "score", "--predict-root", pair["pred"], *args)


def test_truth_outside_a_data_dir_needs_data_dir(pair, capsys):
    labels = pair["tmp"] / "labels" / "truth.csv"
    labels.parent.mkdir()
    pd.read_csv(pair["kaggle"] / "test_truth.csv").to_csv(labels, index=False)
    line = bad_input(capsys, "score", "--predict-root", pair["pred"], "--split", "test",
                     "--truth", labels)
    assert "truth.csv: its directory is not an RxRx1 data directory; give --data-dir" in line
