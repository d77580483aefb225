"""prep.folds: K folds by experiment over the treatment wells of train.csv."""
import os

import pandas as pd
import pytest

from prep.folds import FOLD_COLUMNS, assign_folds, write_folds
from test_metadata import make_layout, write_layout

TRAIN_EXPS = tuple([f"HEPG2-{i:02d}" for i in range(1, 6)] + [f"HUVEC-{i:02d}" for i in range(1, 6)]
                   + ["RPE-01", "RPE-02"])


@pytest.fixture
def data_dir(tmp_path):
    return write_layout(tmp_path / "data", make_layout(train_exps=TRAIN_EXPS,
                                                       test_exps=("U2OS-01",)))


def read_folds(out_dir, n_folds):
    return [(pd.read_csv(os.path.join(out_dir, f"train_{k}.csv")),
             pd.read_csv(os.path.join(out_dir, f"valid_{k}.csv"))) for k in range(n_folds)]


def test_writes_paths_and_exact_columns(data_dir, tmp_path, capsys):
    out = str(tmp_path / "csv")
    paths = write_folds(data_dir, n_folds=5, out_dir=out, seed=0)
    assert paths == [os.path.join(out, f"{kind}_{k}.csv") for k in range(5)
                     for kind in ("train", "valid")]
    assert sorted(os.listdir(out)) == sorted(os.path.basename(p) for p in paths)  # no temp left
    train0 = pd.read_csv(paths[0])
    assert tuple(train0.columns) == FOLD_COLUMNS == (
        "id_code", "experiment", "plate", "well", "sirna", "experiment_type", "dataset")
    assert (train0["dataset"] == "train").all()
    assert (train0["experiment_type"] == train0["experiment"].str.split("-").str[0]).all()
    assert "fold 0: valid" in capsys.readouterr().out


def test_folds_partition_train_treatment_wells_by_experiment(data_dir, tmp_path):
    out = str(tmp_path / "csv")
    write_folds(data_dir, n_folds=5, out_dir=out)
    folds = read_folds(out, 5)
    train = pd.read_csv(os.path.join(data_dir, "train.csv"))
    all_ids = set(train["id_code"])
    assert len(all_ids) == len(TRAIN_EXPS) * 4 * 3  # no controls, no test wells, one row per well

    valid_ids = [set(v["id_code"]) for _, v in folds]
    assert sum(map(len, valid_ids)) == len(all_ids)          # pairwise disjoint ...
    assert set().union(*valid_ids) == all_ids                # ... and covering
    for tr, va in folds:
        assert not set(tr["id_code"]) & set(va["id_code"])
        assert set(tr["id_code"]) | set(va["id_code"]) == all_ids
        assert not set(tr["experiment"]) & set(va["experiment"])  # whole experiments
    fold_of = {}
    for k, (_, va) in enumerate(folds):
        for e in va["experiment"].unique():
            assert e not in fold_of
            fold_of[e] = k
    assert sorted(fold_of) == sorted(TRAIN_EXPS)
    labels = pd.concat([va for _, va in folds]).set_index("id_code")["sirna"]
    assert (labels.sort_index() == train.set_index("id_code")["sirna"].sort_index()).all()


def test_cell_types_spread_and_folds_balanced(data_dir, tmp_path):
    out = str(tmp_path / "csv")
    write_folds(data_dir, n_folds=5, out_dir=out)
    folds = read_folds(out, 5)
    for _, va in folds:
        # 5 HEPG2 and 5 HUVEC experiments dealt over 5 folds: one of each per fold
        assert va["experiment_type"].nunique() > 1
        assert set(va["experiment_type"]) >= {"HEPG2", "HUVEC"}
    n_exps = [va["experiment"].nunique() for _, va in folds]
    assert sorted(n_exps) == [2, 2, 2, 3, 3]


def test_deterministic_for_seed(data_dir, tmp_path):
    def valid_sets(seed, name):
        out = str(tmp_path / name)
        write_folds(data_dir, n_folds=4, out_dir=out, seed=seed)
        return [sorted(va["experiment"].unique()) for _, va in read_folds(out, 4)]

    a, b = valid_sets(0, "a"), valid_sets(0, "b")
    assert a == b
    others = [valid_sets(s, f"s{s}") for s in (1, 2, 3)]
    assert any(o != a for o in others)


def test_assign_folds_round_robin_continues_across_cell_types():
    fold_of = assign_folds({"A": ["A-01", "A-02", "A-03"], "B": ["B-01", "B-02"]}, 2, seed=0)
    assert sorted(fold_of) == ["A-01", "A-02", "A-03", "B-01", "B-02"]
    per_fold = [sorted(e for e, k in fold_of.items() if k == f) for f in range(2)]
    # A fills folds 0,1,0; B continues at fold 1, then 0
    assert [sum(e.startswith("A") for e in p) for p in per_fold] == [2, 1]
    assert [sum(e.startswith("B") for e in p) for p in per_fold] == [1, 1]


@pytest.mark.parametrize("n_folds", [1, 0, 13, 2.5, True])
def test_bad_n_folds(data_dir, tmp_path, n_folds):
    out = tmp_path / "csv"
    with pytest.raises(ValueError, match=r"n_folds=.*from 2 to .*\(12\)"):
        write_folds(data_dir, n_folds=n_folds, out_dir=str(out))
    assert not out.exists()


def test_n_folds_equal_to_experiments(data_dir, tmp_path):
    out = str(tmp_path / "csv")
    write_folds(data_dir, n_folds=12, out_dir=out)
    assert all(va["experiment"].nunique() == 1 for _, va in read_folds(out, 12))
