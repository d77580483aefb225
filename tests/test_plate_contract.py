"""The plate contract at the door (issue 20, kind 4): a plate holding a siRNA twice is refused
by every reader of the well tables (prep, folds, the ensemble), naming the plate and the
siRNA; CSVs holding a header only are one line, 'no sites listed'."""
from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest

from common.errors import BadInput
from infer_fakes import make_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
def twice(tmp_path):
    """Kaggle-layout data whose train.csv row 2 was edited to repeat row 1's siRNA."""
    data = tmp_path / "data"
    make_dataset(data, group_size=10)
    train = pd.read_csv(data / "train.csv")
    plate = train[(train["experiment"] == train["experiment"][0])
                  & (train["plate"] == train["plate"][0])]
    i = plate.index[1]
    train.loc[i, "sirna"] = train["sirna"][0]
    train.to_csv(data / "train.csv", index=False)
    return dict(data=data, plate=int(train["plate"][0]), experiment=train["experiment"][0],
                sirna=int(train["sirna"][0]))


def test_prep_refuses_a_plate_holding_a_sirna_twice(twice, tmp_path):
    line = one_line_error(cli("prep", "folds", "--data-dir", twice["data"], "--n-folds", 2,
                              "--out-dir", tmp_path / "csv"))
    assert (f"plate {twice['plate']} of {twice['experiment']} holds siRNA {twice['sirna']} "
            "twice") in line and "train.csv rows 1, 2" in line
    assert not (tmp_path / "csv").exists()
    line = one_line_error(cli("prep", "shards", "--data-dir", twice["data"], "--out-dir",
                              tmp_path / "store"))
    assert f"holds siRNA {twice['sirna']} twice" in line
    assert not (tmp_path / "store").exists() or not os.listdir(tmp_path / "store")


def test_the_ensemble_refuses_it_too(twice):
    from shards.plate_groups import load_train_groups

    with pytest.raises(BadInput, match=rf"holds siRNA {twice['sirna']} twice"):
        load_train_groups(str(twice["data"]))


@pytest.mark.parametrize("layout", ["kaggle", "release"])
def test_csvs_with_a_header_only_are_no_sites_listed(tmp_path, layout):
    data = tmp_path / "data"
    make_dataset(data, group_size=10, layout=layout)
    for name in os.listdir(data):
        if name.endswith(".csv") and name not in ("sample_submission.csv", "test_truth.csv"):
            header = (data / name).read_text().splitlines()[0]
            (data / name).write_text(header + "\n")
    line = one_line_error(cli("prep", "shards", "--data-dir", data, "--out-dir",
                              tmp_path / "store"))
    assert "no sites listed" in line and str(data) in line
