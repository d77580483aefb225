"""predict-all: runs under a model root, TTA views, per-well averaging; end to end on tiny."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch

from infer import InferError
from infer.predict import Dist, check_run_config, find_runs, predict_wells, tta_views


# ------------------------------------------------------------------ pure parts

def test_tta_views_are_the_dihedral_group():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    assert len(list(tta_views(x, 1))) == 1
    two = list(tta_views(x, 2))
    assert torch.equal(two[1], x.flip(-1))
    eight = list(tta_views(x, 8))
    keys = {tuple(v[0, 0].flatten().tolist()) for v in eight}
    assert len(keys) == 8  # all distinct
    t = x.transpose(-2, -1)  # the transpose is one of them; the identity too
    assert any(torch.equal(v, t) for v in eight) and torch.equal(eight[0], x)
    with pytest.raises(InferError, match="--tta 3"):
        list(tta_views(x, 3))


class _FakeLoader:
    """What shards.make_loader gives predict-all (shuffle off, drop_last off): every site of
    the selection exactly once, in the loader's own order, the last batch short; `rows`
    index the store's sites table (whose `row` column is its position)."""

    def __init__(self, sites, order, batch):
        self.sites = sites
        self.batches = [np.asarray(order[i:i + batch]) for i in range(0, len(order), batch)]

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for rows in self.batches:
            # images encode their row (+1, so row 0 is visible): the model reads it back
            img = torch.zeros(len(rows), 1, 2, 2)
            img[:, 0, 0, 0] = torch.as_tensor(rows + 1, dtype=torch.float32)
            yield img, torch.zeros(len(rows), dtype=torch.int64), torch.as_tensor(rows)


class _RowModel(torch.nn.Module):
    """Logit c of a site = row * (c + 1) + (1 if the view is flipped), so averages are checkable;
    records whether it ran under autocast, and in which dtype."""

    def __init__(self):
        super().__init__()
        self.autocast = []

    def forward(self, x):
        self.autocast.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu")
                             else None)
        row = x[:, 0].amax(dim=(-2, -1)) - 1
        flipped = (x[:, 0, 0, 1] > 0).float()
        c = torch.arange(3, dtype=torch.float32)
        return row[:, None] * (c[None] + 1) + flipped[:, None]


def _store_sites():
    """Seven sites as a store lists them; the last well is not in the selection."""
    ids = ["A-01_1_B02", "A-01_1_B03", "A-01_2_B02", "A-01_3_B02"]
    return pd.DataFrame({"row": np.arange(7), "id_code": np.repeat(ids, 2)[:7],
                         "site": [1, 2] * 3 + [1]})


def test_predict_wells_averages_sites_and_views_in_selection_order():
    sites = _store_sites()
    order = np.random.default_rng(0).permutation(6)     # the loader's own order, rows 0..5
    wells = pd.DataFrame({"id_code": ["A-01_2_B02", "A-01_1_B03", "A-01_1_B02"]})  # wanted order
    loader = _FakeLoader(sites, order, batch=4)          # batches of 4 and 2
    logits, counts = predict_wells(_RowModel(), loader, wells, 2, torch.device("cpu"), Dist())
    assert counts.tolist() == [2, 2, 2]
    row_mean = {"A-01_1_B02": 0.5, "A-01_1_B03": 2.5, "A-01_2_B02": 4.5}
    for i, c in enumerate(wells["id_code"]):
        # views: identity (+0) and h-flip (+1 where the flip moved the marker pixel) -> +0.5
        np.testing.assert_allclose(logits[i], row_mean[c] * np.arange(1, 4) + 0.5)


def test_predict_wells_rejects_sites_outside_the_selection():
    sites = _store_sites()
    wells = pd.DataFrame({"id_code": ["A-01_1_B02"]})
    with pytest.raises(RuntimeError, match="outside the selected wells"):
        predict_wells(_RowModel(), _FakeLoader(sites, [0, 1, 6], 4), wells, 1,
                      torch.device("cpu"), Dist())


def test_prediction_precision_follows_the_run_or_the_option():
    from common.precision import amp_dtype
    from infer.predict import run_amp

    cpu = torch.device("cpu")
    sites = _store_sites()
    wells = pd.DataFrame({"id_code": ["A-01_1_B02"]})
    # the run's own setting when --amp is not given; the option wins when it is
    assert run_amp(None, {"config": {"args": {"amp": "bf16"}}}) == "bf16"
    assert run_amp(None, {"config": {}}) == "auto"
    assert run_amp("none", {"config": {"args": {"amp": "bf16"}}}) == "none"
    with pytest.raises(InferError, match="--amp 'fp8'"):
        run_amp("fp8", {})
    for setting in ("bf16", "none", "auto"):
        model = _RowModel()
        predict_wells(model, _FakeLoader(sites, [0, 1], 4), wells, 1, cpu, Dist(), amp=setting)
        assert model.autocast == [amp_dtype(setting, cpu)], setting
    assert amp_dtype("bf16", cpu) == torch.bfloat16 and amp_dtype("none", cpu) is None


def _fake_run(root, chan, fold, model="m", best=True):
    d = os.path.join(root, chan, *( [f"fold_{fold}"] if fold is not None else []), model, "checkpoints")
    os.makedirs(d, exist_ok=True)
    if best:
        open(os.path.join(d, "best.pth"), "wb").close()
        open(os.path.join(d, "finished.json"), "w").write("{}")
    return d


def test_find_runs_and_its_errors(tmp_path):
    root = str(tmp_path / "logs")
    os.makedirs(root)
    with pytest.raises(InferError, match=r"logs: no checkpoints \[channels\]/fold_<k>/m/"):
        find_runs(root, "m")
    _fake_run(root, "[1,2,3,4,5]", 0)
    _fake_run(root, "[1,2,3,4,5]", 1)
    _fake_run(root, "[2,3,4,5,6]", 0)
    _fake_run(root, "[2,3,4,5,6]", 0, model="other")
    runs = find_runs(root, "m")
    assert [(r.channels, r.fold) for r in runs] == [((1, 2, 3, 4, 5), 0), ((1, 2, 3, 4, 5), 1),
                                                    ((2, 3, 4, 5, 6), 0)]
    assert [r.fold for r in find_runs(root, "m", folds=(1,))] == [1]
    assert len(find_runs(root, "m", channels=[1, 2, 3, 4, 5])) == 2
    assert len(find_runs(root, "m", channels="[2,3,4,5,6]")) == 1
    _fake_run(root, "[1,2,3,5,6]", 0, best=False)
    with pytest.raises(InferError, match=r"without checkpoints/best.pth: .*\[1,2,3,5,6\]/fold_0/m"):
        find_runs(root, "m")


def test_checkpoint_that_disagrees_with_its_folder_errors(tmp_path):
    from infer.predict import Run
    run = Run((1, 2, 3, 4, 5), 0, str(tmp_path / "[1,2,3,4,5]" / "fold_0" / "m"))
    check_run_config(run, {"channels": [1, 2, 3, 4, 5], "fold": 0, "model_name": "m"}, "m")
    with pytest.raises(InferError, match=r"best.pth: trained on channels \[1, 2, 3, 4, 6\] but it "
                                         r"sits in folder \[1,2,3,4,5\]"):
        check_run_config(run, {"channels": [1, 2, 3, 4, 6], "fold": 0, "model_name": "m"}, "m")
    with pytest.raises(InferError, match="trained as fold 2"):
        check_run_config(run, {"channels": [1, 2, 3, 4, 5], "fold": 2, "model_name": "m"}, "m")


# ------------------------------------------------------------------ end to end on the tiny preset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "test_resnet"   # configs/tiny.yml's model


@pytest.fixture(scope="module")
def tiny_run(tiny_data, tiny_store, tmp_path_factory):
    """A pseudo-stage run on the tiny preset, trained through train.run (control first).

    Its train CSV holds the test wells with their true labels (oracle pseudo-labels):
    a tiny model trained honestly on 6 train experiments is near chance, so only a
    model that has seen these wells makes logits informative enough to check that
    predict-all -> group inference recovers every plate's group (rows in the wrong
    order, sites of other wells or a TTA bug would all break that).
    """
    import train
    from shards.layout import cell_type_of

    tmp = tmp_path_factory.mktemp("infer_run")
    test = pd.read_csv(os.path.join(tiny_data, "test.csv"))
    truth = pd.read_csv(os.path.join(tiny_data, "test_truth.csv"))
    oracle = test.merge(truth, on="id_code").assign(
        experiment_type=lambda d: d["experiment"].map(cell_type_of), dataset="test")
    oracle.to_csv(tmp / "oracle_train.csv", index=False)
    oracle.head(12).to_csv(tmp / "oracle_valid.csv", index=False)
    common = dict(overrides=os.path.join(REPO, "configs", "tiny.yml"), channels=[1, 2, 3, 4, 5],
                  logdir=str(tmp / "logs"), shards=tiny_store)
    dotted = {"stages.data_params.image_size": 32, "stages.data_params.norm": "experiment",
              "stages.data_params.train_csv": str(tmp / "oracle_train.csv"),
              "stages.data_params.valid_csv": str(tmp / "oracle_valid.csv"),
              "args.progress": False}
    train.run("control", os.path.join(REPO, "configs", "control.yml"),
              dotted=dict(dotted, **{"stages.stage1.state_params.num_epochs": 0}), **common)
    train.run("pseudo", os.path.join(REPO, "configs", "pseudo.yml"), fold=0, dotted=dict(dotted, **{
        "stages.data_params.sites": "two",
        "stages.stage1.state_params.num_epochs": 6, "stages.stage1.scheduler_params.num_steps": 6,
        "stages.stage1.scheduler_params.lr_range": [0.01, 0.001]}), **common)
    model_root = str(tmp / "logs" / "pseudo")
    assert os.path.isfile(os.path.join(model_root, "[1,2,3,4,5]", "fold_0", MODEL, "checkpoints",
                                       "best.pth"))
    return dict(model_root=model_root, tmp=tmp, valid_csv=str(tmp / "oracle_valid.csv"))


def test_predict_all_writes_the_layout_in_test_csv_order(tiny_run, tiny_data, tiny_store):
    from infer.__main__ import main

    out = str(tiny_run["tmp"] / "pred")
    res = main(["predict-all", "--shards", tiny_store, "--model-root", tiny_run["model_root"],
                "--model-name", MODEL, "--out-dir", out, "--data-dir", tiny_data,
                "--backend", "torch", "--batch-size", "16"])
    run_out = os.path.join(out, "[1,2,3,4,5]", "fold_0", MODEL)
    assert res["files"] == [os.path.join(run_out, "pred_test.npy")]
    logits = np.load(os.path.join(run_out, "pred_test.npy"))
    test_ids = pd.read_csv(os.path.join(tiny_data, "test.csv"))["id_code"]
    assert logits.dtype == np.float32 and logits.shape == (len(test_ids), 1108)
    assert np.isfinite(logits).all()
    assert pd.read_csv(os.path.join(run_out, "ids_test.csv"))["id_code"].tolist() == test_ids.tolist()
    meta = pd.read_json(os.path.join(run_out, "pred_test.json"), typ="series")
    assert meta["sites_per_well"] == 2.0 and meta["tta"] == 1

    # valid split: the run's valid CSV rows, in its order, with the dihedral TTA
    main(["predict-all", "--shards", tiny_store, "--model-root", tiny_run["model_root"],
          "--model-name", MODEL, "--out-dir", out, "--split", "valid", "--tta", "8",
          "--backend", "torch"])
    valid = np.load(os.path.join(run_out, "pred_valid.npy"))
    want = pd.read_csv(tiny_run["valid_csv"])
    assert valid.shape == (len(want), 1108)
    got = pd.read_csv(os.path.join(run_out, "ids_valid.csv"))
    assert got["id_code"].tolist() == want["id_code"].tolist()
    assert got["sirna"].tolist() == want["sirna"].tolist()
    # TTA-8 logits of a well differ from plain ones (the views were applied) but agree in spirit
    plain = pd.DataFrame(logits, index=test_ids).loc[want["id_code"]].to_numpy()
    assert not np.allclose(plain, valid)
    assert np.corrcoef(plain.ravel(), valid.ravel())[0, 1] > 0.9

    # an existing output is left untouched without --overwrite, and rewritten with it: a
    # stand-in file (zeros) shows which happened
    pred = os.path.join(run_out, "pred_test.npy")
    np.save(pred, np.zeros_like(logits))
    stand_in = open(pred, "rb").read()
    again = ["predict-all", "--shards", tiny_store, "--model-root", tiny_run["model_root"],
             "--model-name", MODEL, "--out-dir", out, "--data-dir", tiny_data,
             "--backend", "torch", "--batch-size", "16"]
    assert main(again)["files"] == res["files"]
    assert open(pred, "rb").read() == stand_in
    assert main(again + ["--overwrite"])["files"] == res["files"]
    np.testing.assert_allclose(np.load(pred), logits, rtol=1e-5, atol=1e-5)


def test_checkpoint_in_the_wrong_channel_folder_errors(tiny_run, tiny_store, tmp_path):
    import shutil

    from infer.predict import predict_all

    root = tmp_path / "logs"
    shutil.copytree(os.path.join(tiny_run["model_root"], "[1,2,3,4,5]"), root / "[1,2,3,4,6]")
    with pytest.raises(InferError, match=r"trained on channels \[1, 2, 3, 4, 5\] but it sits in "
                                         r"folder \[1,2,3,4,6\]"):
        predict_all(tiny_store, str(root), MODEL, str(tmp_path / "pred"), backend="torch")
    assert not os.path.exists(tmp_path / "pred" / "[1,2,3,4,6]")
    with pytest.raises(InferError, match=r"no checkpoints .*/densenet121/checkpoints/best.pth"):
        predict_all(tiny_store, str(root), "densenet121", str(tmp_path / "pred"))


def test_group_inference_from_trained_logits_is_right_for_every_tiny_plate(tiny_run, tiny_data,
                                                                          tiny_store, capsys):
    from infer.ensemble import build

    out = _kaggle_pred(tiny_run, tiny_data, tiny_store)
    result, used = build(tiny_data, out)
    assert len(used) == 1
    truth = pd.read_csv(os.path.join(tiny_data, "test_truth.csv")).set_index("id_code")["sirna"]
    wells = result.wells.assign(sirna=truth.loc[result.wells["id_code"]].to_numpy())
    from infer.ensemble import load_train_groups
    groups = load_train_groups(tiny_data)
    plates = result.plates
    assert len(plates) == wells.groupby(["experiment", "plate"]).ngroups == 16
    for r in plates.itertuples(index=False):
        true_sirnas = set(wells[(wells["experiment"] == r.experiment)
                                & (wells["plate"] == r.plate)]["sirna"])
        assert true_sirnas <= set(groups.members[r.group].tolist()), f"{r.experiment}_{r.plate}"
    acc_assigned = np.mean(result.assigned == wells["sirna"].to_numpy())
    acc_argmax = np.mean(result.argmax == wells["sirna"].to_numpy())
    assert acc_assigned >= acc_argmax
    assert "plate" in capsys.readouterr().out


def _kaggle_pred(tiny_run, tiny_data, tiny_store) -> str:
    out = str(tiny_run["tmp"] / "pred")
    if not os.path.isfile(os.path.join(out, "[1,2,3,4,5]", "fold_0", MODEL, "pred_test.npy")):
        from infer.predict import predict_all
        predict_all(tiny_store, tiny_run["model_root"], MODEL, out, data_dir=tiny_data,
                    backend="torch")
    return out


def test_the_infer_path_on_the_release_layout(tiny_run, tiny_data, tiny_store, tmp_path, capsys):
    """predict-all -> ensemble -> score on the release layout of the tiny set (metadata.csv +
    images/, no test.csv, no sample_submission.csv), its store packed from that layout: the
    logits and the submission are the Kaggle layout's, and score reads the public test
    labels of metadata.csv, per cell type and per experiment."""
    from conftest import TINY_SHARD_MB
    from infer.__main__ import main
    from prep.pack import pack
    from prep.synth import synth

    release, store = str(tmp_path / "release"), str(tmp_path / "store")
    synth(release, preset="tiny", seed=0, workers=2, layout_name="release")
    assert not os.path.exists(os.path.join(release, "test.csv"))
    pack(release, store, workers=2, shard_size_mb=TINY_SHARD_MB, seed=0)
    pred = str(tmp_path / "pred")
    main(["predict-all", "--shards", store, "--model-root", tiny_run["model_root"],
          "--model-name", MODEL, "--out-dir", pred, "--data-dir", release,
          "--backend", "torch", "--batch-size", "16"])
    run_out = os.path.join(pred, "[1,2,3,4,5]", "fold_0", MODEL)
    truth = pd.read_csv(os.path.join(tiny_data, "test_truth.csv"))  # the Kaggle layout's labels
    meta = pd.read_csv(os.path.join(release, "metadata.csv"))
    order = meta[(meta["dataset"] == "test") & (meta["well_type"] == "treatment")
                 & (meta["site"] == 1)]["well_id"].tolist()
    assert pd.read_csv(os.path.join(run_out, "ids_test.csv"))["id_code"].tolist() == order
    kaggle_run = os.path.join(_kaggle_pred(tiny_run, tiny_data, tiny_store), "[1,2,3,4,5]",
                              "fold_0", MODEL)
    kaggle = pd.DataFrame(np.load(os.path.join(kaggle_run, "pred_test.npy")),
                          index=pd.read_csv(os.path.join(kaggle_run, "ids_test.csv"))["id_code"])
    np.testing.assert_allclose(np.load(os.path.join(run_out, "pred_test.npy")),
                               kaggle.loc[order].to_numpy(), rtol=0, atol=1e-5)

    sub_path = os.path.join(pred, "submission.csv")
    main(["ensemble", "--data-dir", release, "--predict-root", pred])
    sub = pd.read_csv(sub_path)
    assert sub["id_code"].tolist() == order  # no sample_submission.csv: the source's order
    capsys.readouterr()
    res = main(["score", "--submission", sub_path, "--truth", os.path.join(release, "metadata.csv")])
    printed = capsys.readouterr().out
    merged = truth.merge(sub, on="id_code", suffixes=("_true", ""))
    assert len(merged) == len(order)
    ok = (merged["sirna"] == merged["sirna_true"]).to_numpy()
    assert res["all"]["n"] == len(order) and res["all"]["submission"] == pytest.approx(ok.mean())
    ct = merged["id_code"].str.split("-").str[0].to_numpy()
    exp = merged["id_code"].str.split("_").str[0].to_numpy()
    for c in ("HEPG2", "HUVEC", "RPE", "U2OS"):
        assert res[c]["submission"] == pytest.approx(ok[ct == c].mean()), c
    assert len(res["experiments"]) == 4
    for e, row in res["experiments"].items():
        assert row["submission"] == pytest.approx(ok[exp == e].mean()), e
    assert "metadata.csv" in printed and "HUVEC" in printed

    # the predict root itself, against the data directory's labels: with and without the
    # plate assignment; the assigned figure is the submission's
    scores = main(["score", "--predict-root", pred, "--split", "test", "--truth", release])
    (name, only), = scores.items()
    assert name.startswith("[1,2,3,4,5]/fold_0/")
    assert only["all"]["top1_assigned"] == pytest.approx(ok.mean())
    assert only["all"]["top1_assigned"] >= only["all"]["top1"]
    assert set(only["experiments"]) == set(res["experiments"])


@pytest.mark.parametrize("content", [b"", b"not a torch file at all", b"PK\x03\x04truncated"])
def test_corrupt_or_empty_checkpoint_is_one_line_and_exit_2(tiny_store, tmp_path, capsys, content):
    from infer.__main__ import main

    ck = tmp_path / "logs" / "[1,2,3,4,5]" / "fold_0" / MODEL / "checkpoints" / "best.pth"
    os.makedirs(ck.parent)
    ck.write_bytes(content)
    (ck.parent / "finished.json").write_text("{}")
    with pytest.raises(SystemExit) as e:
        main(["predict-all", "--shards", tiny_store, "--model-root", str(tmp_path / "logs"),
              "--model-name", MODEL, "--out-dir", str(tmp_path / "pred"), "--backend", "torch"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(ck) in err[0], err
    assert not (tmp_path / "pred").exists()
