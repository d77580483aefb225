"""Nothing a user has is overwritten (issue 20, kind 5): an existing output is refused in
one line, exit 2, the file untouched, unless --overwrite; a folds directory of another
scheme is replaced whole, never mixed."""
from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest

from infer_fakes import make_dataset, planted_logits, write_pred

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "se_resnext50_32x4d"


def cli(package, *args):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", package, *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True)


def one_line_error(res) -> str:
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    lines = [x for x in res.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


@pytest.fixture
def fake(tmp_path):
    data = tmp_path / "data"
    test = make_dataset(data, group_size=10)["test"]
    pred = tmp_path / "pred"
    write_pred(pred, "[1,2,3,4,5]", 0, MODEL, planted_logits(test["sirna"], seed=3),
               test["id_code"])
    return dict(data=data, pred=pred)


def test_ensemble_refuses_an_existing_submission_or_sidecar(fake, tmp_path):
    out = tmp_path / "sub.csv"
    sidecar = tmp_path / "sub.probs.npy"
    sidecar.write_bytes(b"mine")
    line = one_line_error(cli("infer", "ensemble", "--data-dir", fake["data"], "--predict-root",
                              fake["pred"], "--out", out))
    assert str(sidecar) in line and "--overwrite" in line
    assert sidecar.read_bytes() == b"mine" and not out.exists()
    res = cli("infer", "ensemble", "--data-dir", fake["data"], "--predict-root", fake["pred"],
              "--out", out, "--overwrite")
    assert res.returncode == 0, res.stderr
    assert len(pd.read_csv(out)) > 0 and sidecar.read_bytes() != b"mine"


def test_pseudo_labels_refuse_to_replace_their_csvs(fake, tmp_path, capsys):
    from infer.pseudo import pseudo_labels
    from prep.folds import write_folds
    from common.errors import BadInput

    folds = tmp_path / "csv"
    write_folds(str(fake["data"]), n_folds=2, out_dir=str(folds))
    out = tmp_path / "pseudo"
    pseudo_labels(str(fake["data"]), str(fake["pred"]), str(folds), str(out))
    (out / "train_0.csv").write_text("edited by hand\n")
    with pytest.raises(BadInput, match=r"pseudo/train_0.csv \(and 4 more\): a pseudo-label CSV "
                                       r"exists; give --overwrite"):
        pseudo_labels(str(fake["data"]), str(fake["pred"]), str(folds), str(out))
    assert (out / "train_0.csv").read_text() == "edited by hand\n"
    pseudo_labels(str(fake["data"]), str(fake["pred"]), str(folds), str(out), overwrite=True)
    assert "id_code" in (out / "train_0.csv").read_text()


def test_preview_refuses_an_existing_out(tiny_store, tmp_path):
    import numpy as np

    sites = pd.read_csv(os.path.join(tiny_store, "sites.csv"))
    png = tmp_path / "source.png"
    png.write_bytes(b"\x89PNG a source image")
    line = one_line_error(cli("prep", "preview", tiny_store, "--id-code", sites["id_code"][0],
                              "--out", png))
    assert str(png) in line and "--overwrite" in line
    assert png.read_bytes() == b"\x89PNG a source image"
    res = cli("prep", "preview", tiny_store, "--id-code", sites["id_code"][0], "--out", png,
              "--overwrite")
    assert res.returncode == 0, res.stderr
    from PIL import Image
    assert np.asarray(Image.open(png)).ndim == 3


def test_folds_of_another_scheme_are_refused_then_replaced_whole(fake, tmp_path):
    from prep.folds import write_folds

    folds = tmp_path / "csv"
    write_folds(str(fake["data"]), n_folds=4, out_dir=str(folds))
    before = {p.name: p.read_bytes() for p in folds.iterdir()}
    write_folds(str(fake["data"]), n_folds=4, out_dir=str(folds))   # the same scheme again
    line = one_line_error(cli("prep", "folds", "--data-dir", fake["data"], "--n-folds", 2,
                              "--out-dir", folds))
    assert "fold scheme" in line and "--overwrite" in line
    assert {p.name: p.read_bytes() for p in folds.iterdir()} == before
    res = cli("prep", "folds", "--data-dir", fake["data"], "--n-folds", 2, "--out-dir", folds,
              "--overwrite")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in folds.iterdir()) == ["train_0.csv", "train_1.csv",
                                                       "valid_0.csv", "valid_1.csv"]
