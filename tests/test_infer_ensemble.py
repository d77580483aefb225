"""ensemble, score and pseudo-labels through the CLI, on planted logits in a fake layout."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from infer import InferError
from infer.__main__ import main
from infer.assign import log_softmax
from infer.pseudo import PSEUDO_COLUMNS
from infer_fakes import make_dataset, planted_logits, write_pred


def cli(*args):
    return main([str(a) for a in args])


@pytest.fixture
def setup(tmp_path):
    """Fake data (test.csv shuffled, sample_submission in yet another order) and a predict root
    with two subsets of fold 0, one of fold 1, one file stored in shuffled row order."""
    data = tmp_path / "data"
    probe = make_dataset(data, group_size=10, shuffle_test_csv=True)
    n = len(probe["test"])
    info = make_dataset(data, group_size=10, shuffle_test_csv=True,
                        sample_order=np.random.default_rng(5).permutation(n))
    test = info["test"]
    truth = test["sirna"].to_numpy()
    pred = tmp_path / "pred"
    logits = {
        ("[1,2,3,4,5]", 0): planted_logits(truth, signal=2.5, seed=11),
        ("[1,2,3,4,6]", 0): planted_logits(truth, signal=2.5, seed=12),
        ("[1,2,3,5,6]", 1): planted_logits(truth, signal=2.5, seed=13),
    }
    for i, ((ch, fold), z) in enumerate(logits.items()):
        write_pred(pred, ch, fold, "se_resnext50_32x4d", z, test["id_code"],
                   shuffle_seed=7 if i == 1 else None)
    return dict(data=data, pred=pred, test=test, truth=truth, logits=logits, tmp=tmp_path)


def _softmax(z):
    return np.exp(log_softmax(z)).astype(np.float32)


def test_ensemble_writes_a_plate_consistent_submission(setup, capsys):
    s = setup
    out = s["tmp"] / "sub" / "submission.csv"
    res = cli("ensemble", "--data-dir", s["data"], "--predict-root", s["pred"], "--out", out)
    printed = capsys.readouterr().out
    assert "HEPG2-02_1" in printed and "margin" in printed  # the per-plate table

    sub = pd.read_csv(out)
    sample = pd.read_csv(s["data"] / "sample_submission.csv")
    assert list(sub.columns) == ["id_code", "sirna"]
    assert sub["id_code"].tolist() == sample["id_code"].tolist()

    # Hierarchical mean: subsets of a fold, then folds.
    z = s["logits"]
    mean = ((z[("[1,2,3,4,5]", 0)] + z[("[1,2,3,4,6]", 0)]) / 2 + z[("[1,2,3,5,6]", 1)]) / 2
    probs = np.load(str(out)[:-4] + ".probs.npy")
    ids = pd.read_csv(str(out)[:-4] + ".ids.csv")["id_code"]
    assert ids.tolist() == s["test"]["id_code"].tolist()
    np.testing.assert_allclose(probs, _softmax(mean), atol=1e-5)

    got = sub.set_index("id_code").loc[s["test"]["id_code"], "sirna"].to_numpy()
    test = s["test"].assign(pred=got)
    for _, plate in test.groupby(["experiment", "plate"]):
        assert plate["pred"].is_unique
        assert set(plate["pred"]) == set(plate["sirna"])  # full plates: exactly the group
    acc_assigned = np.mean(got == s["truth"])
    acc_argmax = np.mean(mean[:, :1108].argmax(1) == s["truth"])
    assert acc_assigned > acc_argmax
    assert res["plates"] == 12 and res["ambiguous_plates"] == 0

    plates = pd.read_csv(str(out)[:-4] + ".plates.csv")
    assert {"experiment", "plate", "group", "margin", "wells"} <= set(plates.columns)

    # score: the submission and, from the probabilities beside it, the plain argmax.
    scores = cli("score", "--submission", out, "--truth", s["data"] / "test_truth.csv")
    assert scores["all"]["submission"] == pytest.approx(acc_assigned)
    assert scores["all"]["argmax (no assignment)"] == pytest.approx(acc_argmax)
    hepg2 = (s["test"]["cell_type"] == "HEPG2").to_numpy()
    assert scores["HEPG2"]["submission"] == pytest.approx(np.mean(got[hepg2] == s["truth"][hepg2]))
    assert scores["HEPG2"]["n"] == int(hepg2.sum())


def test_no_assign_is_the_argmax_and_extra_logits_blend(setup):
    s = setup
    extra = planted_logits(s["truth"], signal=2.5, seed=99)
    np.save(s["tmp"] / "extra.npy", extra)
    out = s["tmp"] / "plain.csv"
    cli("ensemble", "--data-dir", s["data"], "--predict-root", s["pred"], "--out", out,
        "--no-assign", "--model-names", "se_resnext50_32x4d", "--extra-logits", s["tmp"] / "extra.npy")
    z = s["logits"]
    model = ((z[("[1,2,3,4,5]", 0)] + z[("[1,2,3,4,6]", 0)]) / 2 + z[("[1,2,3,5,6]", 1)]) / 2
    blend = (model + extra) / 2
    sub = pd.read_csv(out).set_index("id_code").loc[s["test"]["id_code"], "sirna"].to_numpy()
    np.testing.assert_array_equal(sub, blend[:, :1108].argmax(1))
    assert not os.path.exists(s["tmp"] / "plain.plates.csv")


def test_score_matches_a_hand_computation(tmp_path):
    truth = pd.DataFrame({"id_code": ["HEPG2-02_1_B02", "HEPG2-02_1_B03", "HEPG2-02_2_B02",
                                      "U2OS-02_1_B02", "U2OS-02_1_C02"],
                          "sirna": [1, 2, 3, 4, 5]})
    sub = pd.DataFrame({"id_code": ["U2OS-02_1_C02", "HEPG2-02_1_B02", "HEPG2-02_1_B03",
                                    "HEPG2-02_2_B02", "U2OS-02_1_B02"],
                        "sirna": [5, 1, 9, 3, 7]})
    truth.to_csv(tmp_path / "truth.csv", index=False)
    sub.to_csv(tmp_path / "sub.csv", index=False)
    res = cli("score", "--submission", tmp_path / "sub.csv", "--truth", tmp_path / "truth.csv")
    assert res["all"] == {"n": 5, "submission": pytest.approx(3 / 5)}
    assert res["HEPG2"]["submission"] == pytest.approx(2 / 3)
    assert res["U2OS"]["submission"] == pytest.approx(1 / 2)


def test_score_rejects_unknown_id_codes(tmp_path, capsys):
    pd.DataFrame({"id_code": ["HEPG2-02_1_B02"], "sirna": [1]}).to_csv(tmp_path / "t.csv", index=False)
    pd.DataFrame({"id_code": ["HEPG2-02_1_B02", "RPE-09_4_O23"], "sirna": [1, 2]}).to_csv(
        tmp_path / "s.csv", index=False)
    with pytest.raises(SystemExit) as e:
        cli("score", "--submission", tmp_path / "s.csv", "--truth", tmp_path / "t.csv")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "s.csv" in err and "RPE-09_4_O23" in err and "not in" in err


def test_bad_logit_files_error_naming_the_file(setup):
    s = setup
    from infer.ensemble import build
    bad = s["pred"] / "[1,2,3,4,5]" / "fold_0" / "se_resnext50_32x4d"
    z = s["logits"][("[1,2,3,4,5]", 0)]
    np.save(bad / "pred_test.npy", z[:-1])   # one row short of its ids file
    with pytest.raises(InferError, match=r"\[1,2,3,4,5\]/fold_0/se_resnext50_32x4d/pred_test.npy: "
                                         r"\d+ rows but .*ids_test.csv lists"):
        build(s["data"], s["pred"], quiet=True)
    os.remove(bad / "ids_test.csv")
    with pytest.raises(InferError, match=r"pred_test.npy: \d+ rows but there are \d+ wells"):
        build(s["data"], s["pred"], quiet=True)
    np.save(bad / "pred_test.npy", z[:, :500])
    with pytest.raises(InferError, match=r"pred_test.npy: 1108 class columns, but .*"
                                         r"\[1,2,3,4,5\]/fold_0/se_resnext50_32x4d/pred_test.npy has 500"):
        build(s["data"], s["pred"], quiet=True)
    np.save(bad / "pred_test.npy", z[0])
    with pytest.raises(InferError, match=r"pred_test.npy: logits must be 2-D"):
        build(s["data"], s["pred"], quiet=True)
    np.save(s["tmp"] / "short.npy", z[:3])
    with pytest.raises(InferError, match=r"short.npy: 3 rows"):
        build(s["data"], None, extra_logits=[str(s["tmp"] / "short.npy")], quiet=True)


def test_empty_predict_root_and_unknown_model_error(setup, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        cli("ensemble", "--data-dir", setup["data"], "--predict-root", tmp_path / "empty")
    assert e.value.code == 2
    assert "empty: no [channels]/fold_<k>/<model>/pred_test.npy" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli("ensemble", "--data-dir", setup["data"], "--predict-root", setup["pred"],
            "--model-names", "densenet121")
    assert "no pred_test.npy for model(s) densenet121" in capsys.readouterr().err


def test_sample_submission_with_unknown_ids_errors(setup):
    s = setup
    sample = pd.read_csv(s["data"] / "sample_submission.csv")
    sample.loc[0, "id_code"] = "HEPG2-02_1_O23X"
    sample.to_csv(s["data"] / "sample_submission.csv", index=False)
    with pytest.raises(InferError, match=r"sample_submission.csv: 1 id_code\(s\) that are not test"):
        from infer.ensemble import ensemble
        ensemble(s["data"], s["pred"], out=str(s["tmp"] / "x.csv"))


@pytest.mark.parametrize("mode", ["full", "group"])
def test_pseudo_labels_keep_only_confident_test_wells(setup, mode):
    from infer.ensemble import load_train_groups
    from prep.folds import write_folds

    s = setup
    folds_dir = s["tmp"] / "csv"
    write_folds(s["data"], n_folds=2, out_dir=str(folds_dir))
    out = s["tmp"] / "sub.csv"
    cli("ensemble", "--data-dir", s["data"], "--predict-root", s["pred"], "--out", out)
    probs = np.load(s["tmp"] / "sub.probs.npy")
    ids = pd.read_csv(s["tmp"] / "sub.ids.csv")["id_code"]
    assigned = pd.read_csv(out).set_index("id_code").loc[ids, "sirna"].to_numpy()
    conf = probs[np.arange(len(ids)), assigned]
    if mode == "group":  # renormalize by hand over the assigned siRNA's group
        members = {int(x): m for m in load_train_groups(s["data"]).members for x in m}
        conf = conf / np.array([probs[i, members[int(a)]].sum() for i, a in enumerate(assigned)])
    p = float(np.quantile(conf, 0.6))
    expected = set(ids[conf >= p])
    assert 0 < len(expected) < len(ids)   # the threshold bites

    res = cli("pseudo-labels", "--data-dir", s["data"], "--predict-root", s["pred"],
              "--folds-dir", folds_dir, "--out-dir", folds_dir / "pseudo", "--min-confidence", p,
              "--confidence", mode)
    assert res["pseudo_rows"] == len(expected) and res["folds"] == [0, 1]
    truth_by_id = dict(zip(ids, assigned))
    for k in (0, 1):
        tr = pd.read_csv(folds_dir / "pseudo" / f"train_{k}.csv")
        va = pd.read_csv(folds_dir / "pseudo" / f"valid_{k}.csv")
        assert list(tr.columns) == list(PSEUDO_COLUMNS) == list(va.columns)
        orig_tr = pd.read_csv(folds_dir / f"train_{k}.csv")
        orig_va = pd.read_csv(folds_dir / f"valid_{k}.csv")
        pseudo = tr[tr["dataset"] == "test"]
        assert set(pseudo["id_code"]) == expected
        assert all(truth_by_id[i] == v for i, v in zip(pseudo["id_code"], pseudo["sirna"]))
        assert set(pseudo["experiment_type"]) <= {"HEPG2", "HUVEC", "U2OS"}
        pd.testing.assert_frame_equal(tr[tr["dataset"] == "train"].reset_index(drop=True),
                                      orig_tr[list(PSEUDO_COLUMNS)])
        pd.testing.assert_frame_equal(va, orig_va[list(PSEUDO_COLUMNS)])
    with pytest.raises(InferError, match="would overwrite the fold CSVs"):
        from infer.pseudo import pseudo_labels
        pseudo_labels(s["data"], s["pred"], folds_dir, folds_dir)


def _hand_assigned(z, valid):
    """Each plate's wells matched one-to-one to the siRNAs the plate holds (its group: whole
    experiments are in a valid fold, so every plate is full), maximizing the summed logit."""
    from scipy.optimize import linear_sum_assignment

    out = np.empty(len(valid), np.int64)
    for _, idx in valid.groupby(["experiment", "plate"]).groups.items():
        idx = np.asarray(idx)
        members = np.sort(valid.loc[idx, "sirna"].to_numpy())
        rows, cols = linear_sum_assignment(-z[idx][:, members].astype(np.float64))
        out[idx[rows]] = members[cols]
    return out


def test_score_valid_per_run_fold_and_out_of_fold(setup, capsys):
    from prep.folds import write_folds

    s = setup
    folds_dir = s["tmp"] / "csv"
    write_folds(s["data"], n_folds=2, out_dir=str(folds_dir))
    pred = s["tmp"] / "predv"
    # expected figures: name -> (n, top1, top1_assigned), from the planted logits by hand
    hand, oof = {}, []
    for k in (0, 1):
        valid = pd.read_csv(folds_dir / f"valid_{k}.csv")
        truth = valid["sirna"].to_numpy()
        zs = []
        for j, ch in enumerate(("[1,2,3,4,5]", "[2,3,4,5,6]")):
            z = planted_logits(valid["sirna"], signal=2.5, seed=100 + 10 * k + j)
            write_pred(pred, ch, k, "m", z, valid["id_code"], split="valid", shuffle_seed=k)
            hand[f"{ch}/fold_{k}/m"] = (len(valid), np.mean(z.argmax(1) == truth),
                                        np.mean(_hand_assigned(z, valid) == truth))
            zs.append(z)
        mean = (zs[0] + zs[1]) / 2
        right = (mean.argmax(1) == truth, _hand_assigned(mean, valid) == truth)
        hand[f"fold_{k} ensemble (2 files)"] = (len(valid), right[0].mean(), right[1].mean())
        oof.append(right)
    hand["all folds (out-of-fold)"] = (sum(len(r[0]) for r in oof),
                                       np.concatenate([r[0] for r in oof]).mean(),
                                       np.concatenate([r[1] for r in oof]).mean())
    res = cli("score", "--predict-root", pred, "--split", "valid", "--folds-dir", folds_dir)
    assert set(res) == set(hand)
    for name, (n, top1, assigned) in hand.items():
        got = res[name]["all"]
        assert (got["n"], got["top1"], got["top1_assigned"]) == \
            (n, pytest.approx(top1, abs=1e-6), pytest.approx(assigned, abs=1e-6)), name
    n_train = len(pd.read_csv(s["data"] / "train.csv"))
    assert res["all folds (out-of-fold)"]["all"]["n"] == n_train
    # the figures tell the parts apart: the plate assignment and the averaging both help
    assert hand["all folds (out-of-fold)"][2] > hand["all folds (out-of-fold)"][1]
    assert len({v[1] for v in hand.values()}) > 3
    assert "top1_assigned" in capsys.readouterr().out
