"""Progressive pseudo labels (train.progressive_pseudo): per plate, within its group, no
siRNA twice, a share that grows to every well."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from shards.plate_groups import derive_groups
from train.config_schema import ConfigError
from train.progressive_pseudo import (ProgressiveSchedule, labelled_share, plate_labels,
                                      progressive_labels)

N_CLASSES = 1139
GROUP = 12


def _setup(seed=0, noise=1.5, missing=1):
    """4 groups of 12 siRNAs; train plates of two experiments; test plates of two more,
    each plate one group (shuffled per experiment) with `missing` wells left out."""
    rng = np.random.default_rng(seed)
    members = rng.permutation(4 * GROUP).reshape(4, GROUP)
    train = [(f"HEPG2-0{e}", p + 1, s) for e in (1, 2) for p in range(4)
             for s in members[(p + e) % 4]]
    groups = derive_groups(pd.DataFrame(train, columns=["experiment", "plate", "sirna"]))
    rows, truth = [], []
    for exp in ("HUVEC-01", "RPE-01"):
        for plate, g in zip(range(1, 5), rng.permutation(4)):
            for s in rng.permutation(members[g])[:GROUP - missing]:
                rows.append((f"{exp}_{plate}_X{len(rows):02d}", exp, plate))
                truth.append(s)
    wells = pd.DataFrame(rows, columns=["id_code", "experiment", "plate"])
    truth = np.asarray(truth)
    logits = rng.normal(0, noise, (len(wells), N_CLASSES))
    logits[np.arange(len(wells)), truth] += 3.0
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    return groups, wells, probs, truth


def _plate_group(groups, wells, truth):
    """The true group of each plate (what infer_plate_groups should find)."""
    g_of = groups.group_of()
    return {(e, p): g_of[int(truth[i])] for i, (e, p) in
            enumerate(zip(wells["experiment"], wells["plate"]))}


@pytest.mark.parametrize("share", [0.3, 0.6, 1.0])
def test_never_a_sirna_twice_per_plate_and_never_outside_the_group(share):
    groups, wells, probs, truth = _setup()
    out = progressive_labels(probs, wells, groups, share)
    truth_group = _plate_group(groups, wells, truth)
    for (e, p), lab in out.groupby(["experiment", "plate"]):
        assert lab["sirna"].is_unique, (e, p)
        members = set(groups.members[truth_group[(e, p)]].tolist())
        assert set(lab["sirna"]) <= members, (e, p)
        assert len(lab) == int(np.floor(share * (GROUP - 1) + 1e-9))
    assert out["well"].is_unique
    assert (out["id_code"] == wells["id_code"].to_numpy()[out["well"]]).all()


def test_confident_wells_come_first():
    groups, wells, probs, truth = _setup()
    argmax_acc = (probs[:, :4 * GROUP].argmax(1) == truth).mean()      # ~0.4 at this noise
    acc = []
    for share in (0.3, 0.6, 1.0):
        out = progressive_labels(probs, wells, groups, share)
        acc.append((out["sirna"].to_numpy() == truth[out["well"].to_numpy()]).mean())
    assert acc[0] > acc[1] > acc[2] > argmax_acc + 0.15, (acc, argmax_acc)
    assert acc[0] > 0.9


def test_the_share_grows_each_epoch_to_every_well():
    sched = ProgressiveSchedule(start_epoch=2, full_epoch=6, start_share=0.2)
    shares = [sched.share(e) for e in range(9)]
    assert shares[:2] == [0.0, 0.0] and shares[2] == pytest.approx(0.2)
    assert all(b > a for a, b in zip(shares[2:6], shares[3:7])) and shares[6:] == [1.0] * 3
    groups, wells, probs, _ = _setup(seed=1)
    counts = [len(progressive_labels(probs, wells, groups, s)) for s in shares]
    assert counts[0] == 0 and counts[-1] == len(wells)
    assert all(b >= a for a, b in zip(counts, counts[1:])) and counts[3] > counts[2]
    assert labelled_share(3, 3, 3, 0.5) == 1.0     # start == full: everything at once


def test_a_sirna_given_on_a_plate_is_taken_from_its_other_wells():
    members = np.array([10, 11, 12])
    probs = np.zeros((3, 20))
    probs[0, [10, 11, 12]] = [0.90, 0.05, 0.05]   # surest: gets 10
    probs[1, [10, 11, 12]] = [0.60, 0.30, 0.10]   # prefers 10; without it 11 by a margin 0.2
    probs[2, [10, 11, 12]] = [0.50, 0.45, 0.05]   # prefers 10; without it 11 by 0.4: first
    rows, sirnas, margins = plate_labels(probs, members, 1.0)
    assert rows.tolist() == [0, 2, 1] and sirnas.tolist() == [10, 11, 12]
    assert margins.tolist() == pytest.approx([0.85, 0.40, 0.10])
    # with a margin floor the unsure wells stay unlabelled
    rows, sirnas, _ = plate_labels(probs, members, 1.0, min_margin=0.5)
    assert rows.tolist() == [0] and sirnas.tolist() == [10]


def _brute_force(probs, members, share, min_margin=0.0):
    """The same greedy, recomputing every margin at every step."""
    p = probs[:, members] / probs[:, members].sum(1, keepdims=True)
    quota = min(len(p), len(members), int(np.floor(share * len(p) + 1e-9)))
    avail, open_, out = np.ones(len(members), bool), np.ones(len(p), bool), []
    while len(out) < quota:
        best = (-np.inf, None, None)
        for r in np.flatnonzero(open_):
            q = np.sort(p[r, avail])[::-1]
            m = q[0] - (q[1] if len(q) > 1 else 0.0)
            if m > best[0]:
                best = (m, r, np.flatnonzero(avail)[np.argmax(p[r, avail])])
        if best[0] < min_margin:
            break
        _, r, c = best
        out.append((r, members[c]))
        open_[r], avail[c] = False, False
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_incremental_greedy_equals_the_brute_force(seed):
    rng = np.random.default_rng(seed)
    members = rng.permutation(40)[:15]
    probs = rng.dirichlet(np.full(40, 0.3), size=14)
    for share, mm in ((1.0, 0.0), (0.5, 0.0), (1.0, 0.05)):
        rows, sirnas, _ = plate_labels(probs, members, share, mm)
        assert list(zip(rows.tolist(), sirnas.tolist())) == \
            [(int(r), int(s)) for r, s in _brute_force(probs, members, share, mm)]


def test_schedule_from_config_and_its_errors():
    assert ProgressiveSchedule.from_params(None) is None
    assert ProgressiveSchedule.from_params(False) is None
    assert ProgressiveSchedule.from_params(True) == ProgressiveSchedule()
    s = ProgressiveSchedule.from_params({"start_epoch": 1, "full_epoch": 3})
    assert (s.start_epoch, s.full_epoch) == (1, 3)
    with pytest.raises(ConfigError, match=r"progressive_pseudo: unknown key\(s\) \['start'\]"):
        ProgressiveSchedule.from_params({"start": 1})
    with pytest.raises(ConfigError, match="0 <= start_epoch <= full_epoch"):
        ProgressiveSchedule.from_params({"start_epoch": 5, "full_epoch": 2})
    with pytest.raises(ConfigError, match="start_share must be in"):
        ProgressiveSchedule.from_params({"start_share": 0})
