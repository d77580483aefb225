"""Bad input to `python -m infer`: one line naming the file, row or run, exit 2; nothing lost.

Each case was found by attacking the CLI (issue 11) and failed before its fix.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest

from infer.__main__ import main
from infer_fakes import make_dataset, planted_logits, write_pred

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "se_resnext50_32x4d"


def cli(*args):
    return main([str(a) for a in args])


def bad_input(capsys, *args) -> str:
    """Run the CLI expecting bad input: exit 2 and one `error:` line; returns that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli(*args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture
def fake(tmp_path):
    """Fake data and a predict root with three runs (two subsets of fold 0, one of fold 1)."""
    data = tmp_path / "data"
    info = make_dataset(data, group_size=10)
    test = info["test"]
    pred = tmp_path / "pred"
    for i, (ch, fold) in enumerate((("[1,2,3,4,5]", 0), ("[1,2,3,4,6]", 0), ("[1,2,3,5,6]", 1))):
        write_pred(pred, ch, fold, MODEL, planted_logits(test["sirna"], seed=20 + i),
                   test["id_code"])
    return dict(data=data, pred=pred, test=test, tmp=tmp_path)


# ------------------------------------------------------------------ ensemble: missing members

def test_ensemble_refuses_a_run_without_its_predictions(fake, capsys):
    run = fake["pred"] / "[1,2,3,4,6]" / "fold_0" / MODEL
    os.remove(run / "pred_test.npy")          # predict-all stopped after the ids file
    os.makedirs(fake["pred"] / "[2,3,4,5,6]" / "fold_1" / MODEL)   # ... or before any file
    out = fake["tmp"] / "sub.csv"
    line = bad_input(capsys, "ensemble", "--data-dir", fake["data"], "--predict-root",
                     fake["pred"], "--out", out)
    assert "2 run(s) without pred_test.npy" in line
    assert f"[1,2,3,4,6]/fold_0/{MODEL}" in line and f"[2,3,4,5,6]/fold_1/{MODEL}" in line
    assert "--allow-missing" in line and not out.exists()

    res = cli("ensemble", "--data-dir", fake["data"], "--predict-root", fake["pred"],
              "--out", out, "--allow-missing")
    assert res["members"] == 2 and out.exists()
    err = capsys.readouterr().err
    assert "WARNING: 2 run(s) without pred_test.npy left out" in err


def test_ensemble_with_model_root_expects_every_finished_run(fake, capsys):
    logs = fake["tmp"] / "logs"
    for ch, fold in (("[1,2,3,4,5]", 0), ("[1,2,3,4,5]", 2)):
        ck = logs / ch / f"fold_{fold}" / MODEL / "checkpoints"
        os.makedirs(ck)
        (ck / "best.pth").write_bytes(b"")
    os.makedirs(logs / "[1,2,3,4,5]" / "fold_3" / MODEL)   # not finished: not expected
    line = bad_input(capsys, "ensemble", "--data-dir", fake["data"], "--predict-root",
                     fake["pred"], "--model-root", logs, "--out", fake["tmp"] / "s.csv")
    assert f"1 run(s) without pred_test.npy: [1,2,3,4,5]/fold_2/{MODEL}" in line
    res = cli("ensemble", "--data-dir", fake["data"], "--predict-root", fake["pred"],
              "--model-root", logs, "--out", fake["tmp"] / "s.csv", "--allow-missing")
    assert res["members"] == 3


# ------------------------------------------------------------------ ensemble: sample_submission

def test_duplicate_id_in_sample_submission_is_an_error_naming_the_row(fake, capsys):
    path = fake["data"] / "sample_submission.csv"
    sample = pd.read_csv(path)
    dup = sample["id_code"].iloc[3]
    pd.concat([sample, sample.iloc[[3]]]).to_csv(path, index=False)
    out = fake["tmp"] / "sub.csv"
    line = bad_input(capsys, "ensemble", "--data-dir", fake["data"], "--predict-root",
                     fake["pred"], "--out", out)
    assert f"sample_submission.csv, row {len(sample) + 1}: id_code {dup} appears again " \
           "(first in row 4)" in line
    assert not out.exists()


# ------------------------------------------------------------------ pseudo-labels guard

def test_pseudo_labels_refuse_a_link_to_the_folds_directory(fake, capsys):
    from prep.folds import write_folds

    folds_dir = fake["tmp"] / "csv"
    write_folds(fake["data"], n_folds=2, out_dir=str(folds_dir))
    before = {p: (folds_dir / p).read_bytes() for p in os.listdir(folds_dir)}
    link = fake["tmp"] / "pseudo_link"
    os.symlink(folds_dir, link)
    for out_dir in (link, folds_dir / "." / "", fake["tmp"] / "x" / ".." / "pseudo_link"):
        line = bad_input(capsys, "pseudo-labels", "--data-dir", fake["data"], "--predict-root",
                         fake["pred"], "--folds-dir", folds_dir, "--out-dir", out_dir)
        assert "is the folds directory" in line
    assert {p: (folds_dir / p).read_bytes() for p in os.listdir(folds_dir)} == before


# ------------------------------------------------------------------ score

def _truth(tmp_path):
    t = pd.DataFrame({"id_code": ["HEPG2-02_1_B02", "HEPG2-02_1_B03"], "sirna": [1, 2]})
    t.to_csv(tmp_path / "truth.csv", index=False)
    return tmp_path / "truth.csv"


@pytest.mark.parametrize("content, needle", [
    ("", "sub.csv: file is empty"),
    ("id_code,sirna\n", "sub.csv: the submission has a header but no rows"),
    ("id_code,sirna\nHEPG2-02_1_B02,1\nHEPG2-02_1_B03,99999\n",
     "sub.csv, row 2 (id_code HEPG2-02_1_B03): sirna 99999 out of range (need 0..1107)"),
    ("id_code,sirna\nHEPG2-02_1_B02,1\nHEPG2-02_1_B03,1108\n",
     "sub.csv, row 2 (id_code HEPG2-02_1_B03): sirna 1108 out of range (need 0..1107)"),
    ("id_code,sirna\nHEPG2-02_1_B02,-3\n", "sub.csv, row 1 (id_code HEPG2-02_1_B02): sirna -3 out"),
    ("id_code,sirna\nHEPG2-02_1_B02,abc\n", "sub.csv, row 1 (id_code HEPG2-02_1_B02): sirna 'abc' "
                                            "is not an integer"),
    ("id_code,sirna\nHEPG2-02_1_B02,1\nHEPG2-02_1_B02,2\n",
     "sub.csv, row 2: id_code HEPG2-02_1_B02 appears more than once"),
])
def test_score_bad_submissions(tmp_path, capsys, content, needle):
    truth = _truth(tmp_path)
    (tmp_path / "sub.csv").write_text(content)
    line = bad_input(capsys, "score", "--submission", tmp_path / "sub.csv", "--truth", truth)
    assert needle in line


def test_score_a_good_submission_still_scores(tmp_path):
    truth = _truth(tmp_path)
    (tmp_path / "sub.csv").write_text("id_code,sirna\nHEPG2-02_1_B03,2\nHEPG2-02_1_B02,5\n")
    res = cli("score", "--submission", tmp_path / "sub.csv", "--truth", truth)
    assert res["all"] == {"n": 2, "submission": 0.5}


# ------------------------------------------------------------------ predict-all arguments

@pytest.mark.parametrize("args, needle", [
    (["--batch-size", "0"], "--batch-size 0: need an integer >= 1"),
    (["--batch-size", "-4"], "--batch-size -4: need an integer >= 1"),
    (["--tta", "3"], "--tta 3: choose one of (1, 2, 8)"),
    (["--amp", "fp8"], "--amp 'fp8': choose one of auto, bf16, fp16, none"),
    (["--folds", "x"], "--folds: 'x' is not a fold number"),
    (["--channels", "[1,2,3,4,9]"], "--channels"),
])
def test_predict_all_bad_arguments(tmp_path, capsys, args, needle):
    logs = tmp_path / "logs"
    ck = logs / "[1,2,3,4,5]" / "fold_0" / "m" / "checkpoints"
    os.makedirs(ck)
    (ck / "best.pth").write_bytes(b"")
    line = bad_input(capsys, "predict-all", "--shards", tmp_path / "nostore", "--model-root",
                     logs, "--model-name", "m", "--out-dir", tmp_path / "pred", *args)
    assert needle in line
    assert not (tmp_path / "pred").exists()


def test_every_infer_command_answers_help():
    for command in ("predict-all", "ensemble", "pseudo-labels", "score"):
        proc = subprocess.run([sys.executable, "-m", "infer", command, "--help"], cwd=REPO,
                              capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, PAGER="cat"))
        assert proc.returncode == 0, (command, proc.stderr)
        assert f"infer {command}" in proc.stdout + proc.stderr


def test_allow_missing_is_documented_in_ensemble_help():
    from infer.__main__ import ensemble
    assert "--allow-missing" in ensemble.__doc__ and "--model-root" in ensemble.__doc__
