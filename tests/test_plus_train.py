"""The plus recipe wired into the trainer: configs/plus.yml on the tiny preset trains
Parts II and III from a control model, configs/first.yml trains one run with no Part I,
and predict-all gives (n_test, 1108) with TTA 8 for both; their keys are validated
(unknown keys, cross-checks) before any data is read."""
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from train import load_for_inference
from train.config import ConfigError, changed_keys, load_config
from train import checkpoint as ckpt
from train.recipe import KILL_ENV, fit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBSET = "[1,2,3,4,5]"
OVERLAY = "configs/tiny.yml,configs/plus.yml"   # the overlay last: tiny sets model: cell_timm


@pytest.fixture(scope="module")
def env(tiny_data, tiny_store, tmp_path_factory):
    from prep.folds import write_folds
    root = tmp_path_factory.mktemp("plus")
    write_folds(tiny_data, n_folds=5, out_dir=str(root / "csv"))
    return {"data": tiny_data, "store": tiny_store, "csv": str(root / "csv"), "root": root}


def cli(env, part, overrides, *extra):
    args = [sys.executable, "-m", "train", part, "--config", f"configs/{part}.yml",
            "--overrides", overrides, "--channels", SUBSET, "--shards", env["store"],
            "--logdir", str(env["root"] / "logs"),
            f"--stages.data_params.train_csv={env['csv']}/train_{{fold}}.csv",
            f"--stages.data_params.valid_csv={env['csv']}/valid_{{fold}}.csv", *extra]
    e = dict(os.environ)
    e.pop(KILL_ENV, None)
    return subprocess.run(args, cwd=REPO, env=e, capture_output=True, text=True, timeout=900)


def history(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def trained(env):
    """Part I as the reference (1 + 1 epochs), then Part II with the overlay (1 + 2 epochs,
    test wells pseudo-labelled for the 2nd epoch of stage1), both through the CLI."""
    r = cli(env, "control", "configs/tiny.yml", "--stages.stage1.state_params.num_epochs=1")
    assert r.returncode == 0, r.stderr[-3000:]
    r = cli(env, "finetune", OVERLAY, "--stages.stage1.state_params.num_epochs=2",
            "--stages.data_params.progressive_pseudo.start_epoch=1")
    assert r.returncode == 0, r.stderr[-3000:]
    run = env["root"] / "logs" / "finetune" / SUBSET / "fold_0" / "test_resnet"
    return {"run": run, "stdout": r.stdout}


def test_plus_finetune_trains_1139_classes_on_treatments_and_controls(env, trained):
    from shards import open_store
    model, rc = load_for_inference(str(trained["run"] / "checkpoints/best.pth"))
    assert type(model).__name__ == "PlusNet" and model.takes_cell_type
    assert rc["num_classes"] == 1139 and model.head.margin is not None
    assert model.head.neck[1].out_features == 1024
    assert rc["config"]["plus"] is True
    # One site per well per epoch: the fold's train treatments + the controls of its
    # train experiments + every test control well (labels 1108..1138).
    sites = open_store(env["store"]).sites
    wells = sites.drop_duplicates("id_code")
    train = pd.read_csv(f"{env['csv']}/train_0.csv")
    train_exps = set(train["id_code"].str.rsplit("_", n=2).str[0])
    controls = wells[(wells["well_type"] != "treatment")
                     & (wells["experiment"].isin(train_exps) | (wells["split"] == "test"))]
    treatments = int((train["sirna"] < 1108).sum())
    h = history(trained["run"])
    assert h[0]["samples"] == treatments + len(controls)
    assert (controls["split"] == "test").any() and len(controls) > 0
    # Validation reads the treatment columns only (1108) and the wells stay treatments.
    n_valid = int((pd.read_csv(f"{env['csv']}/valid_0.csv")["sirna"] < 1108).sum())
    assert all(line["n_valid_wells"] == n_valid for line in h)
    assert all(np.isfinite(line["train_loss"]) for line in h)


def test_progressive_labels_join_the_next_epoch(env, trained):
    from shards import open_store
    h = history(trained["run"])
    sites = open_store(env["store"]).sites
    test = sites[(sites["split"] == "test") & (sites["well_type"] == "treatment")] \
        .drop_duplicates("id_code").set_index("id_code")
    # quota of stage1's 2nd epoch (x = 1/2): round(0.7 N); skipped repeats make it fewer
    n = h[1]["pseudo_labelled"]
    assert [line.get("pseudo_labelled") is None for line in h] == [True, False, True]
    assert 0 < n <= round(0.7 * len(test)) and h[1]["pseudo_added"] == n
    assert h[2]["samples"] == h[1]["samples"]           # grow_epoch false: same length
    last = ckpt.load(str(trained["run"] / "checkpoints/last.pth"))
    labels = pd.DataFrame(last["progressive_labels"])
    assert len(labels) == n and set(labels["id_code"]) <= set(test.index)
    pairs = {(e, p, s) for e, p, s in zip(labels["experiment"], labels["plate"], labels["label"])}
    assert len(pairs) == len(labels) and labels["label"].between(0, 1107).all()  # once a plate
    table = {(e, p): g for e, p, g in last["progressive_plate_groups"]}
    assert set(table) == set(map(tuple, test[["experiment", "plate"]].drop_duplicates()
                                 .to_numpy().tolist()))


def test_the_cell_type_changes_the_trained_models_logits(trained):
    model, _ = load_for_inference(str(trained["run"] / "checkpoints/best.pth"))
    x = torch.randn(2, 5, 64, 64)
    with torch.no_grad():
        a, b = model(x, torch.tensor([0, 0])), model(x, torch.tensor([1, 1]))
    assert a.shape == (2, 1139) and not torch.allclose(a, b)


def test_predict_all_gives_1108_columns_with_tta_8(env, trained):
    out = env["root"] / "pred"
    r = subprocess.run([sys.executable, "-m", "infer", "predict-all", "--shards", env["store"],
                        "--data-dir", env["data"], "--model-root", str(env["root"] / "logs/finetune"),
                        "--model-name", "test_resnet", "--out-dir", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    d = out / SUBSET / "fold_0" / "test_resnet"
    pred = np.load(d / "pred_test.npy")
    meta = json.loads((d / "pred_test.json").read_text())
    test = pd.read_csv(os.path.join(env["data"], "test.csv"))
    assert pred.shape == (len(test), 1108) and np.isfinite(pred).all()
    assert meta["tta"] == 8 and meta["trained_classes"] == 1139


def test_plus_pseudo_trains_from_the_control_model(env, trained):
    from shards import open_store
    sites = open_store(env["store"]).sites
    test_wells = sites[(sites["split"] == "test") & (sites["well_type"] == "treatment")] \
        .drop_duplicates("id_code")
    pdir = env["root"] / "pseudo_csv"
    pdir.mkdir()
    train = pd.read_csv(f"{env['csv']}/train_0.csv")
    pseudo = pd.DataFrame({"id_code": test_wells["id_code"], "experiment": test_wells["experiment"],
                           "plate": test_wells["plate"], "well": test_wells["well"],
                           "sirna": [i % 12 for i in range(len(test_wells))], "dataset": "test"})
    pd.concat([train, pseudo]).to_csv(pdir / "train_0.csv", index=False)
    pd.read_csv(f"{env['csv']}/valid_0.csv").to_csv(pdir / "valid_0.csv", index=False)
    cfg = load_config("pseudo", "configs/pseudo.yml", overrides=OVERLAY, channels=SUBSET,
                      shards=env["store"], logdir=str(env["root"] / "logs"), dotted={
                          "stages.data_params.train_csv": str(pdir / "train_{fold}.csv"),
                          "stages.data_params.valid_csv": str(pdir / "valid_{fold}.csv"),
                          "stages.stage0.state_params.num_epochs": 1,    # backbone frozen
                          "stages.stage1.state_params.num_epochs": 0})
    out = fit(cfg)
    assert not out["skipped"] and type(out["model"]).__name__ == "PlusNet"
    # the control model's backbone, loaded and (frozen) unchanged
    control = ckpt.load(str(env["root"] / "logs" / "control" / SUBSET / "test_resnet"
                            / "checkpoints/best.pth"))["model_state_dict"]
    params = dict(out["model"].named_parameters())
    body = {k[len("backbone."):]: p for k, p in params.items() if k.startswith("backbone.")}
    assert body and all(torch.equal(p.detach(), control[k]) for k, p in body.items())
    # one site per well: train treatments + pseudo test wells + the training experiments'
    # and the test experiments' control wells
    wells = sites.drop_duplicates("id_code")
    exps = set(train["id_code"].str.rsplit("_", n=2).str[0])
    controls = wells[(wells["well_type"] != "treatment")
                     & (wells["experiment"].isin(exps) | (wells["split"] == "test"))]
    assert out["history"][0]["samples"] == int((train["sirna"] < 1108).sum()) + len(pseudo) \
        + len(controls)


PLUS_TORCHRUN = """
import sys, torch
from train.config import load_config
from train.recipe import fit
store, csv, logdir, control, out = sys.argv[1:6]
cfg = load_config("finetune", "configs/finetune.yml", overrides="%s", channels="%s",
                  shards=store, logdir=logdir, dotted={
                      "args.pretrained_control": control,
                      "stages.data_params.train_csv": csv + "/train_{fold}.csv",
                      "stages.data_params.valid_csv": csv + "/valid_{fold}.csv",
                      "stages.data_params.batch_size": 8,
                      "stages.stage0.state_params.num_epochs": 0,
                      "stages.stage1.state_params.num_epochs": 2,
                      "stages.data_params.progressive_pseudo.start_epoch": 1})
res = fit(cfg)
torch.distributed.barrier()
rank = torch.distributed.get_rank()
torch.save({"state": res["model"].state_dict(), "history": res["history"]}, f"{out}/rank{rank}.pt")
""" % (OVERLAY, SUBSET)


def test_plus_finetune_under_torchrun_keeps_the_ranks_identical(env, trained, tmp_path):
    """Two gloo ranks of the plus recipe (CutMix/jitter/zoom drawn per rank, ArcFace, the
    cell-type head, progressive labels from all-reduced predictions) end with one model."""
    script = tmp_path / "plus_ddp.py"
    script.write_text(PLUS_TORCHRUN)
    control = env["root"] / "logs" / "control" / SUBSET / "test_resnet" / "checkpoints/best.pth"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", str(script), env["store"],
                        env["csv"], str(tmp_path / "logs"), str(control), str(tmp_path)], cwd=REPO,
                       env=dict(os.environ, OMP_NUM_THREADS="1",
                                PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    a, b = (torch.load(tmp_path / f"rank{i}.pt", weights_only=False) for i in (0, 1))
    assert a["state"].keys() == b["state"].keys()
    assert all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
    from shards import open_store
    sites = open_store(env["store"]).sites
    n_test = sites[(sites["split"] == "test") & (sites["well_type"] == "treatment")]["id_code"].nunique()
    n = a["history"][0].get("pseudo_labelled")
    assert 0 < n <= n_test and a["history"][1].get("pseudo_labelled") is None
    assert [h.get("pseudo_labelled") for h in b["history"]] == [n, None]
    assert [h["samples"] for h in a["history"]] == [h["samples"] for h in b["history"]]
    assert all(np.isfinite(h["train_loss"]) for h in a["history"])


# ------------------------------------------------------------------ the keys

def tiny(part="finetune", overrides=OVERLAY, **dotted):
    return load_config(part, f"configs/{part}.yml", overrides=overrides, dotted=dotted)


def test_the_overlay_loads_and_every_key_defaults_off():
    cfg = tiny()
    assert cfg.plus and cfg.model_params.model == "cell_plus"
    assert cfg.model_params.model_name == "test_resnet"       # tiny's backbone kept
    off = tiny(overrides="configs/tiny.yml")
    dp = off.stages.data_params
    assert (off.plus, off.model_params.cell_type_input, off.model_params.arcface,
            off.model_params.neck, off.model_params.bn_momentum, off.model_params.first_conv,
            dp.controls_as_classes, dp.cutmix, dp.jitter, dp.zoom, dp.progressive_pseudo,
            off.predict_params.tta) == (False, False, None, None, None, "copy_rgb", False,
                                        None, None, None, None, None)
    # plus keeps none of the 4th place's regularizers
    assert (cfg.stages.criterion_params.smoothing, cfg.model_params.drop_rate,
            cfg.stages.data_params.channel_dropout, cfg.stages.data_params.shear_p) == (0, 0, 0, 0)


def test_an_unknown_key_in_the_overlay_is_rejected_naming_it(tmp_path):
    bad = yaml.safe_load(open(os.path.join(REPO, "configs/plus.yml")))
    bad["stages"]["data_params"]["cutmix"]["alpha"] = 1.0
    p = tmp_path / "plus_bad.yml"
    p.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match=r"stages.data_params.cutmix: unknown key\(s\) \['alpha'\]"):
        tiny(overrides=f"configs/tiny.yml,{p}")
    bad = yaml.safe_load(open(os.path.join(REPO, "configs/plus.yml")))
    bad["model_params"]["arcfce"] = True
    p.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match=r"unknown key 'model_params.arcfce'"):
        tiny(overrides=f"configs/tiny.yml,{p}")


@pytest.mark.parametrize("dotted, message", [
    ({"model_params.model": "cell_timm"}, r"cell_type_input needs model_params.model: cell_plus"),
    ({"model_params.num_classes": 1108}, r"controls_as_classes needs model_params.num_classes 1139"),
    ({"stages.data_params.controls_as_classes": False}, r"1139 classes need stages.data_params"),
    ({"stages.data_params.zoom.min_side": 2}, r"zoom.min_side 2: need a number in \[0, 1\]"),
    ({"model_params.arcface.s": "big"}, r"model_params.arcface.s 'big'"),
    ({"stages.data_params.progressive_pseudo.start_epoch": 0},
     r"progressive_pseudo.start_epoch 0"),
    ({"stages.data_params.progressive_pseudo.grow_epoch": True},
     r"grow_epoch needs a schedule that follows the fractional epoch"),
    ({"predict_params.tta": 3}, r"predict_params.tta 3"),
])
def test_cross_checks_name_the_key(dotted, message):
    with pytest.raises(ConfigError, match=message):
        tiny(**dotted)


def test_part_one_refuses_the_parts_two_three_keys():
    with pytest.raises(ConfigError, match="controls_as_classes is for Parts II/III"):
        tiny("control", "configs/tiny.yml", **{"stages.data_params.controls_as_classes": True})


def test_runs_saved_before_the_new_keys_still_match():
    now = tiny(overrides="configs/tiny.yml").to_dict()
    saved = json.loads(json.dumps(now))
    for k in ("cell_type_input", "arcface", "neck", "bn_momentum", "first_conv"):
        del saved["model_params"][k]
    del saved["plus"], saved["predict_params"], saved["stages"]["data_params"]["cutmix"]
    assert changed_keys(saved, now) == []
    changed = {k for k, _, _ in changed_keys(saved, tiny().to_dict())}
    assert {"model_params.cell_type_input", "model_params.model", "model_params.arcface.s",
            "stages.data_params.cutmix.beta"} <= changed and "plus" not in changed


def test_repeated_overrides_are_refused_in_one_line():
    r = subprocess.run([sys.executable, "-m", "train", "finetune", "--overrides", "configs/plus.yml",
                        "--overrides", "configs/tiny.yml"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "--overrides given twice" in r.stderr   # common.cli, before any work
    assert len(r.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------ the 1st place's recipe

FIRST = ["--stages.stage1.state_params.num_epochs=2",
         "--stages.stage1.scheduler_params.segments=[0.003,1,0.001,3,0]",
         "--stages.data_params.progressive_pseudo.start_epoch=1",
         "--model_params.model_name=test_resnet", "--model_params.pretrained=none",
         "--model_params.neck.dim=64"]


def test_first_trains_one_run_without_part_one_and_predicts_1108_columns(env, trained):
    """configs/first.yml from the CLI: 6 channels, no control model, both sites of every
    well each epoch, the epoch grown by its pseudo labels; predict-all (n_test, 1108), TTA 8."""
    from shards import open_store
    logdir = env["root"] / "first_logs"
    args = [sys.executable, "-m", "train", "finetune", "--overrides",
            "configs/tiny.yml,configs/first.yml", "--channels", "[1,2,3,4,5,6]",
            "--shards", env["store"], "--logdir", str(logdir),
            f"--stages.data_params.train_csv={env['csv']}/train_{{fold}}.csv",
            f"--stages.data_params.valid_csv={env['csv']}/valid_{{fold}}.csv", *FIRST]
    r = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    run = logdir / "finetune" / "[1,2,3,4,5,6]" / "fold_0" / "test_resnet"
    model, rc = load_for_inference(str(run / "checkpoints/best.pth"))
    assert rc["num_classes"] == 1139 and rc["n_channels"] == 6 and rc["norm"] == "sample"
    assert rc["config"]["args"]["pretrained_control"] is None
    sites = open_store(env["store"]).sites
    wells = sites.drop_duplicates("id_code")
    train = pd.read_csv(f"{env['csv']}/train_0.csv")
    exps = set(train["id_code"].str.rsplit("_", n=2).str[0])
    controls = wells[(wells["well_type"] != "treatment")
                     & (wells["experiment"].isin(exps) | (wells["split"] == "test"))]
    h = history(run)
    base = int((train["sirna"] < 1108).sum()) + len(controls)
    assert h[0]["samples"] == 2 * base                  # both sites: two samples a well
    n = h[0]["pseudo_labelled"]
    assert n > 0 and h[1]["samples"] == 2 * (base + n)  # the epoch grew by the labelled wells
    assert h[0]["lr"] == pytest.approx(0.003) and h[1]["lr"] == pytest.approx(0.001)  # restart
    assert (run / "tensorboard").is_dir() and any((run / "tensorboard").iterdir())
    out = env["root"] / "first_pred"
    r = subprocess.run([sys.executable, "-m", "infer", "predict-all", "--shards", env["store"],
                        "--data-dir", env["data"], "--model-root", str(logdir / "finetune"),
                        "--model-name", "test_resnet", "--out-dir", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    d = out / "[1,2,3,4,5,6]" / "fold_0" / "test_resnet"
    pred = np.load(d / "pred_test.npy")
    assert pred.shape == (len(pd.read_csv(os.path.join(env["data"], "test.csv"))), 1108)
    assert np.isfinite(pred).all() and json.loads((d / "pred_test.json").read_text())["tta"] == 8
