"""The plus recipe wired into the trainer: configs/plus.yml on the tiny preset trains
Parts II and III from a control model, and predict-all gives (n_test, 1108) with TTA 8;
its keys are validated (unknown keys, cross-checks) before any data is read."""
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
    every test well pseudo-labelled for the 2nd epoch of stage1), both through the CLI."""
    r = cli(env, "control", "configs/tiny.yml", "--stages.stage1.state_params.num_epochs=1")
    assert r.returncode == 0, r.stderr[-3000:]
    r = cli(env, "finetune", OVERLAY, "--stages.stage1.state_params.num_epochs=2",
            "--stages.data_params.progressive_pseudo.start_epoch=1",
            "--stages.data_params.progressive_pseudo.full_epoch=1")
    assert r.returncode == 0, r.stderr[-3000:]
    run = env["root"] / "logs" / "finetune" / SUBSET / "fold_0" / "test_resnet"
    return {"run": run, "stdout": r.stdout}


def test_plus_finetune_trains_1139_classes_on_treatments_and_controls(env, trained):
    from shards import open_store
    model, rc = load_for_inference(str(trained["run"] / "checkpoints/best.pth"))
    assert type(model).__name__ == "PlusNet" and model.takes_cell_type
    assert rc["num_classes"] == 1139 and model.head.arcface is not None
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
    from train import checkpoint as ckpt
    from shards import open_store
    h = history(trained["run"])
    sites = open_store(env["store"]).sites
    test = sites[(sites["split"] == "test") & (sites["well_type"] == "treatment")] \
        .drop_duplicates("id_code").set_index("id_code")
    assert [line.get("pseudo_labelled") for line in h] == [None, len(test), None]
    assert h[2]["samples"] == h[1]["samples"]           # the epoch keeps its length
    labels = pd.DataFrame(ckpt.load(str(trained["run"] / "checkpoints/last.pth"))
                          ["progressive_labels"])
    assert sorted(labels["id_code"]) == sorted(test.index)
    plates = test.loc[labels["id_code"], ["experiment", "plate"]].to_numpy()
    pairs = {(e, p, s) for (e, p), s in zip(map(tuple, plates), labels["label"])}
    assert len(pairs) == len(labels) and labels["label"].between(0, 1107).all()  # once a plate


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
                          "stages.stage0.state_params.num_epochs": 0,
                          "stages.stage1.state_params.num_epochs": 1})
    out = fit(cfg)
    assert not out["skipped"] and type(out["model"]).__name__ == "PlusNet"
    assert out["history"][0]["samples"] > len(train) + len(pseudo)   # + the control wells


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
                      "stages.data_params.progressive_pseudo.start_epoch": 1,
                      "stages.data_params.progressive_pseudo.full_epoch": 1})
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
    assert [h.get("pseudo_labelled") for h in a["history"]] == [n_test, None]
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
            dp.controls_as_classes, dp.cutmix, dp.jitter, dp.zoom, dp.progressive_pseudo,
            off.predict_params.tta) == (False, False, None, False, None, None, None, None, None)


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
    ({"stages.data_params.zoom.min_side": 2}, r"zoom.min_side 2.0: must be in \(0, 1\]"),
    ({"model_params.arcface.s": "big"}, r"model_params.arcface.s 'big'"),
    ({"stages.data_params.progressive_pseudo.full_epoch": 1},
     r"progressive_pseudo: start_epoch 10 and full_epoch 1"),
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
    for k in ("cell_type_input", "arcface"):
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
