"""The synthetic generator writes the Kaggle layout exactly and plants a real, learnable signal."""
import hashlib
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from prep.synth import PRESETS, experiment_list, limit_experiments, synth
from shards import layout


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_tiny")
    synth(str(out), preset="tiny", seed=0, workers=2)
    return str(out)


def read_csvs(d):
    return {n: pd.read_csv(os.path.join(d, f"{n}.csv")) for n in
            ("train", "test", "train_controls", "test_controls", "pixel_stats",
             "sample_submission", "test_truth")}


def test_csv_schemas_are_the_kaggle_ones(tiny):
    c = read_csvs(tiny)
    assert list(c["train"].columns) == ["id_code", "experiment", "plate", "well", "sirna"]
    assert list(c["test"].columns) == ["id_code", "experiment", "plate", "well"]
    for n in ("train_controls", "test_controls"):
        assert list(c[n].columns) == ["id_code", "experiment", "plate", "well", "sirna", "well_type"]
        assert set(c[n].well_type) == {"positive_control", "negative_control"}
        assert set(c[n].sirna) <= set(range(layout.CONTROL_BASE, layout.N_SIRNAS))
    assert list(c["pixel_stats"].columns) == ["id_code", "experiment", "plate", "well", "site",
                                              "channel", "mean", "std", "median", "min", "max"]
    assert list(c["sample_submission"].columns) == ["id_code", "sirna"]
    assert list(c["sample_submission"].id_code) == list(c["test"].id_code)
    assert list(c["test_truth"].id_code) == list(c["test"].id_code)
    assert c["train"].sirna.between(0, layout.N_TREATMENTS - 1).all()


def test_every_listed_well_has_twelve_pngs_of_the_right_kind(tiny):
    c = read_csvs(tiny)
    size = PRESETS["tiny"]["image_size"]
    n = 0
    for split, names in (("train", ("train", "train_controls")), ("test", ("test", "test_controls"))):
        for name in names:
            for r in c[name].itertuples():
                assert r.id_code == layout.make_id_code(r.experiment, r.plate, r.well)
                assert r.well in layout.WELLS
                for site in layout.SITES:
                    for ch in layout.CHANNELS:
                        im = Image.open(layout.png_path(tiny, split, r.experiment, r.plate, r.well, site, ch))
                        assert im.mode == "L" and im.size == (size, size)
                        n += 1
    files = sum(len(f) for _, _, f in os.walk(os.path.join(tiny, "train"))) + \
        sum(len(f) for _, _, f in os.walk(os.path.join(tiny, "test")))
    assert files == n  # no PNG without a CSV row (missing wells have no images)
    assert len(c["pixel_stats"]) == n


def test_plate_constraint_and_controls_hold(tiny):
    c = read_csvs(tiny)
    truth = c["test"].merge(c["test_truth"], on="id_code")
    treat = pd.concat([c["train"], truth])
    groups = {}
    for (exp, plate), g in treat.groupby(["experiment", "plate"]):
        assert g.sirna.is_unique, f"{exp} plate {plate} repeats a siRNA"
        groups[(exp, plate)] = frozenset(g.sirna)
    # each plate's siRNAs come from one of 4 disjoint groups; an experiment's 4 plates use all 4
    distinct = []
    for s in groups.values():
        match = [g for g in distinct if g & s]
        if not match:
            distinct.append(set(s))
        else:
            match[0].update(s)
    assert len(distinct) == layout.N_GROUPS
    assert sum(len(g) for g in distinct) == len(set().union(*distinct))  # disjoint
    for exp in treat.experiment.unique():
        used = [next(i for i, g in enumerate(distinct) if groups[(exp, p)] <= g) for p in layout.PLATES]
        assert sorted(used) == [0, 1, 2, 3], f"{exp} does not hold each group on one plate"
    # every plate holds every control once, in train and test
    ctrl = pd.concat([c["train_controls"], c["test_controls"]])
    n_ctrl = PRESETS["tiny"]["n_controls"]
    for (exp, plate), g in ctrl.groupby(["experiment", "plate"]):
        assert len(g) == n_ctrl and g.sirna.is_unique
    # a few wells are missing on purpose
    n_full = len(treat.experiment.unique()) * len(layout.PLATES) * PRESETS["tiny"]["group_size"]
    assert 0 < n_full - len(treat) <= PRESETS["tiny"]["missing"]


def test_experiment_names_follow_the_real_style():
    exps = experiment_list(PRESETS["full"])
    assert sum(e.split == "train" for e in exps) == 33 and sum(e.split == "test" for e in exps) == 18
    assert exps[0].name == "HEPG2-01" and all(e.name.split("-")[0] == e.cell_type for e in exps)
    two = limit_experiments(exps, 2)
    assert [e.split for e in two] == ["train", "test"]
    with pytest.raises(ValueError, match="1..51"):
        limit_experiments(exps, 99)


def test_output_depends_on_seed_not_on_workers(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    synth(a, preset="tiny", seed=3, experiments=2, workers=1)
    synth(b, preset="tiny", seed=3, experiments=2, workers=2)
    synth(c, preset="tiny", seed=4, experiments=2, workers=2)

    def digest(d):
        h = hashlib.sha256()
        for root, _, files in sorted(os.walk(d)):
            for f in sorted(files):
                if f != "synth.json":
                    h.update(open(os.path.join(root, f), "rb").read())
        return h.hexdigest()
    assert digest(a) == digest(b)
    assert digest(a) != digest(c)


def site_features(d, df, split):
    """log of mean, std and 90th percentile per channel, both sites averaged: 18 numbers a well."""
    out = []
    for r in df.itertuples():
        f = []
        for site in layout.SITES:
            s = []
            for ch in layout.CHANNELS:
                a = np.asarray(Image.open(layout.png_path(d, split, r.experiment, r.plate, r.well, site, ch)),
                               np.float64)
                s += [a.mean(), a.std(), np.percentile(a, 90)]
            f.append(np.log1p(s))
        out.append(np.mean(f, 0))
    return np.array(out)


def nearest_centroid_accuracy(X, y, exp, normalize):
    if normalize:
        X = X.copy()
        for e in np.unique(exp):
            m = exp == e
            X[m] = (X[m] - X[m].mean(0)) / X[m].std(0).clip(1e-9)
    accs = []
    for e in np.unique(exp):  # leave one experiment out
        te, tr = exp == e, exp != e
        classes = np.unique(y[te])
        cent = np.stack([X[tr & (y == k)].mean(0) for k in classes])
        pred = classes[((X[te][:, None] - cent[None]) ** 2).sum(-1).argmin(1)]
        accs.append((pred == y[te]).mean())
    return float(np.mean(accs))


def test_planted_signal_is_learnable_and_needs_normalization(tiny):
    c = read_csvs(tiny)
    wells = pd.concat([c["train"], c["train_controls"][c["train"].columns]])
    X = site_features(tiny, wells, "train")
    y, exp = wells.sirna.values, wells.experiment.values
    chance = 1 / len(np.unique(y))
    acc_norm = nearest_centroid_accuracy(X, y, exp, normalize=True)
    acc_raw = nearest_centroid_accuracy(X, y, exp, normalize=False)
    assert acc_norm > 4 * chance, (acc_norm, chance)
    assert acc_norm > acc_raw + 0.1, (acc_norm, acc_raw)
    # ... and it is not trivial: simple statistics leave most wells wrong
    assert acc_norm < 0.9


def test_unknown_preset_and_bad_size_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown preset"):
        synth(str(tmp_path), preset="huge")
    with pytest.raises(ValueError, match="image-size"):
        synth(str(tmp_path), preset="tiny", image_size=300)


def test_image_size_zero_is_refused_not_64(tmp_path):
    # Was: `int(image_size or default)` quietly turned 0 into the preset's 64 px.
    with pytest.raises(ValueError, match="--image-size 0"):
        synth(str(tmp_path / "out"), preset="tiny", image_size=0)
    assert not (tmp_path / "out").exists()


def test_refuses_a_data_directory_that_is_not_a_synth(tiny, tmp_path):
    # A user's Kaggle data: CSVs and PNGs, no synth.json. Nothing may be touched.
    data = tmp_path / "rxrx1"
    (data / "train" / "HEPG2-01" / "Plate1").mkdir(parents=True)
    for name in ("train.csv", "test.csv", "train_controls.csv", "test_controls.csv"):
        (data / name).write_bytes(open(os.path.join(tiny, name), "rb").read())
    png = data / "train" / "HEPG2-01" / "Plate1" / "B02_s1_w1.png"
    png.write_bytes(b"user's image")
    before = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=f"{data}: not empty and holds no synth.json"):
        synth(str(data), preset="tiny", seed=0, workers=1)
    assert {p: p.read_bytes() for p in data.rglob("*") if p.is_file()} == before


def test_refuses_a_synth_of_other_parameters(tmp_path):
    out = tmp_path / "synth"
    out.mkdir()
    (out / "synth.json").write_text('{"preset": "tiny", "seed": 1, "image_size": 64, '
                                    '"experiments": ["HEPG2-01"]}')
    (out / "train.csv").write_text("id_code\n")
    with pytest.raises(ValueError, match="synth of other parameters"):
        synth(str(out), preset="tiny", seed=0, experiments=1, workers=1)
    assert (out / "train.csv").read_text() == "id_code\n"


def test_relations_csv_lists_the_planted_families(tiny):
    """relations.csv names exactly the families design() planted: every pair of a family,
    members from different plate groups, sharing a phenotype direction that unrelated
    siRNAs do not share."""
    from prep.synth import FAMILY_SHARE, FAMILY_SIZE, design
    rel = pd.read_csv(os.path.join(tiny, "relations.csv"))
    assert list(rel.columns) == ["sirna_a", "sirna_b", "family"]
    des = design(PRESETS["tiny"], 0)
    fams = des["families"]
    assert fams.shape == (2, FAMILY_SIZE) and len(np.unique(fams)) == fams.size
    want = {(int(a), int(b), f) for f, fam in enumerate(fams) for a in fam for b in fam if a < b}
    assert set(map(tuple, rel.to_numpy().tolist())) == want and len(rel) == len(want) == 6
    group_of = {int(s): g for g, grp in enumerate(des["groups"]) for s in grp}
    for fam in fams:
        assert len({group_of[int(s)] for s in fam}) == FAMILY_SIZE
    ph = des["phenotype"][:des["n_treat"]]
    unit = ph / np.linalg.norm(ph, axis=1, keepdims=True)
    cos = unit @ unit.T
    related = np.zeros_like(cos, bool)
    related[rel.sirna_a, rel.sirna_b] = related[rel.sirna_b, rel.sirna_a] = True
    off = ~np.eye(len(cos), dtype=bool)
    assert cos[related].min() > 0.3, cos[related]
    assert cos[related].mean() > FAMILY_SHARE ** 2 - 0.25
    assert abs(cos[off & ~related].mean()) < 0.15


def test_families_change_only_their_members(monkeypatch):
    """Planting draws from its own stream: without it every other siRNA, response and
    baseline is what it was, so the data outside the families did not change."""
    import prep.synth as synth_mod
    des = synth_mod.design(PRESETS["demo"], 0)
    monkeypatch.setattr(synth_mod, "plant_families",
                        lambda ph, groups, seed: np.zeros((0, 3), np.int64))
    plain = synth_mod.design(PRESETS["demo"], 0)
    members = np.unique(des["families"])
    others = np.setdiff1d(np.arange(layout.N_SIRNAS), members)
    assert np.array_equal(des["phenotype"][others], plain["phenotype"][others])
    assert not np.allclose(des["phenotype"][members], plain["phenotype"][members])
    assert np.array_equal(des["groups"], plain["groups"])
    for ct in layout.CELL_TYPES:
        assert np.array_equal(des["response"][ct], plain["response"][ct])
