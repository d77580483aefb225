"""siRNA plate groups, per-plate group inference and the Hungarian assignment, on planted logits."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from infer.assign import assign_plate, assign_plates, log_softmax
from infer.ensemble import load_train_groups
from infer.wells import load_test_wells
from infer.groups import derive_groups, format_plate_table, infer_plate_groups
from shards.plate_groups import GroupError
from infer_fakes import make_dataset, planted_logits


def _softmax(z):
    return np.exp(log_softmax(z))


@pytest.fixture
def data(tmp_path):
    info = make_dataset(tmp_path / "data", group_size=12, shuffle_test_csv=True)
    info["dir"] = tmp_path / "data"
    return info


def test_groups_are_derived_from_train_plates(data):
    groups = load_train_groups(data["dir"])
    assert groups.n_groups == 4 and groups.sizes == [12] * 4
    assert sorted(map(sorted, (m.tolist() for m in groups.members))) == \
        sorted(map(sorted, data["groups"].tolist()))
    assert groups.distinct_per_experiment
    assert groups.plate_numbers == {1, 2, 3, 4}


def test_groups_merge_when_a_plate_mixes_them():
    # Plate B holds siRNAs of two otherwise separate groups: they become one group.
    df = pd.DataFrame({"experiment": ["E-01"] * 6, "plate": [1, 1, 2, 2, 3, 3],
                       "sirna": [0, 1, 2, 3, 1, 2]})
    groups = derive_groups(df)
    assert [m.tolist() for m in groups.members] == [[0, 1, 2, 3]]
    two = derive_groups(df.iloc[:4])
    assert [m.tolist() for m in two.members] == [[0, 1], [2, 3]]


def test_test_wells_follow_test_csv_order(data):
    wells = load_test_wells(data["dir"])
    assert wells["id_code"].tolist() == data["test"]["id_code"].tolist()
    assert not wells["id_code"].is_monotonic_increasing  # the fixture shuffled test.csv


def test_group_inference_picks_the_planted_group(data):
    groups = load_train_groups(data["dir"])
    test = data["test"]
    probs = _softmax(planted_logits(test["sirna"], signal=3.0, noise=1.0))
    table = infer_plate_groups(probs, test, groups, use_experiment=False)
    assert len(table) == 3 * 4
    truth_members = {g: set(m) for g, m in enumerate(data["groups"].tolist())}
    for r in table.itertuples(index=False):
        planted = truth_members[data["plate_group"][(r.experiment, r.plate)]]
        assert set(groups.members[r.group].tolist()) == planted, (r.experiment, r.plate)
        assert not r.ambiguous and r.margin > 0.05


def test_assignment_is_one_to_one_within_the_group_and_beats_argmax(data):
    groups = load_train_groups(data["dir"])
    test = data["test"]
    truth = test["sirna"].to_numpy()
    logits = planted_logits(truth, signal=2.5, noise=1.0, seed=3)
    logp = log_softmax(logits)
    table = infer_plate_groups(np.exp(logp), test, groups)
    assigned = assign_plates(logp, test, table, groups)
    group_of = {(r.experiment, r.plate): set(groups.members[r.group].tolist())
                for r in table.itertuples(index=False)}
    for (e, p), idx in test.groupby(["experiment", "plate"]).groups.items():
        got = assigned[np.asarray(idx)]
        assert len(set(got.tolist())) == len(got), f"{e}_{p}: an siRNA used twice"
        assert set(got.tolist()) <= group_of[(e, p)], f"{e}_{p}: an siRNA outside the group"
    acc_argmax = np.mean(logp[:, :1108].argmax(1) == truth)
    acc_assigned = np.mean(assigned == truth)
    assert 0.2 < acc_argmax < 0.9  # noisy enough to matter
    assert acc_assigned >= acc_argmax
    assert acc_assigned > acc_argmax + 0.1


def test_assignment_fixes_a_clear_collision():
    # Both wells prefer siRNA 0; only the one-to-one matching gets well B right.
    logp = np.full((2, 4), -9.0)
    logp[0, [0, 1]] = [5.0, 4.0]    # well A: truth 0
    logp[1, [0, 1]] = [5.5, 5.0]    # well B: truth 1
    assert logp.argmax(1).tolist() == [0, 0]
    assert assign_plate(logp, np.array([0, 1, 2])).tolist() == [0, 1]


def test_missing_wells_leave_sirnas_unused(tmp_path):
    probe = make_dataset(tmp_path / "probe", group_size=6)
    gone = probe["test"]["id_code"].iloc[[0, 1, 7]].tolist()   # 2 from one plate, 1 from another
    info = make_dataset(tmp_path / "data", group_size=6, missing=gone)
    groups = load_train_groups(tmp_path / "data")
    test = info["test"]
    logp = log_softmax(planted_logits(test["sirna"], signal=6.0))
    table = infer_plate_groups(np.exp(logp), test, groups)
    assert int(table["missing_wells"].sum()) == 3
    assert sorted(table.loc[table["missing_wells"] > 0, "missing_wells"].tolist()) == [1, 2]
    assigned = assign_plates(logp, test, table, groups)
    assert (assigned == test["sirna"].to_numpy()).all()
    assert "missing well" in format_plate_table(table)


def test_ambiguous_plate_is_reported_and_settled_by_its_experiment(data):
    groups = load_train_groups(data["dir"])
    test = data["test"]
    logits = planted_logits(test["sirna"], signal=3.0)
    first = (test["experiment"] == test["experiment"].iloc[0]) & (test["plate"] == 1)
    logits[first.to_numpy()] = 0.0   # no information at all on this plate
    probs = _softmax(logits)
    table = infer_plate_groups(probs, test, groups, min_margin=0.05)
    row = table[(table["experiment"] == test["experiment"].iloc[0]) & (table["plate"] == 1)].iloc[0]
    assert row["ambiguous"]
    assert abs(row["margin"]) < 0.05
    assert table["ambiguous"].sum() == 1
    planted = set(data["groups"][data["plate_group"][(row["experiment"], 1)]].tolist())
    assert set(groups.members[row["group"]].tolist()) == planted  # the other 3 plates decide
    assert "AMBIGUOUS" in format_plate_table(table)


def test_plate_with_more_wells_than_any_group_errors(data):
    groups = load_train_groups(data["dir"])
    wells = pd.DataFrame({"experiment": ["HEPG2-02"] * 13, "plate": [1] * 13})
    probs = np.full((13, 1108), 1 / 1108, np.float32)
    with pytest.raises(GroupError, match=r"plate HEPG2-02_1: 13 wells .* largest siRNA group"):
        infer_plate_groups(probs, wells, groups)


def test_plate_without_train_counterpart_errors():
    train = pd.DataFrame({"experiment": ["A-01"] * 6, "plate": [1, 1, 2, 2, 3, 3],
                          "sirna": [0, 1, 2, 3, 4, 5]})
    groups = derive_groups(train)
    wells = pd.DataFrame({"experiment": ["A-02", "A-02"], "plate": [4, 4]})
    with pytest.raises(GroupError, match=r"plate A-02_4: plate number 4 has no train counterpart"):
        infer_plate_groups(np.full((2, 1108), 1 / 1108), wells, groups)


def test_predictions_outside_every_group_error(data):
    groups = load_train_groups(data["dir"])
    test = data["test"]
    logits = np.zeros((len(test), 1139), np.float32)
    logits[:, 1108:] = 50.0   # everything on the controls
    with pytest.raises(GroupError, match=r"plate .*: the predictions put almost no probability"):
        infer_plate_groups(_softmax(logits), test, groups)


def test_too_few_class_columns_error(data):
    groups = load_train_groups(data["dir"])
    with pytest.raises(GroupError, match="too few class columns"):
        infer_plate_groups(np.ones((len(data["test"]), 10)), data["test"], groups)
