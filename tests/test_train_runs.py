"""The three parts end to end on the tiny store: layout, freezing, init from control,
learning, resume after a SIGKILL, torchrun with two CPU ranks."""
import json
import os
import signal
import subprocess
import sys

import pandas as pd
import pytest
import torch

from common.precision import cpu_has_native_bf16

from train import checkpoint as ckpt
from train import load_for_inference
from train.config import ConfigError, load_config
from train.models import head_parameter_names
from train.recipe import KILL_ENV, fit
from train.weights import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBSET = "[1,2,3,4,5]"


@pytest.fixture(scope="module")
def env(tiny_data, tiny_store, tmp_path_factory):
    from prep.folds import write_folds
    root = tmp_path_factory.mktemp("train")
    csv = root / "csv"
    write_folds(tiny_data, n_folds=5, out_dir=str(csv))
    return {"store": tiny_store, "csv": str(csv), "root": root}


def cli_args(env, logdir, part="control", extra=()):
    return [sys.executable, "-m", "train", part, "--config", f"configs/{part}.yml",
            "--overrides", "configs/tiny.yml", "--channels", SUBSET, "--shards", env["store"],
            "--logdir", str(logdir),
            f"--stages.data_params.train_csv={env['csv']}/train_{{fold}}.csv",
            f"--stages.data_params.valid_csv={env['csv']}/valid_{{fold}}.csv", *extra]


def run_cli(args, env_extra=None, timeout=600):
    e = dict(os.environ)
    e.pop(KILL_ENV, None)
    e.update(env_extra or {})
    return subprocess.run(args, cwd=REPO, env=e, capture_output=True, text=True, timeout=timeout)


def config(env, part, logdir, **dotted):
    d = {"stages.data_params.train_csv": f"{env['csv']}/train_{{fold}}.csv",
         "stages.data_params.valid_csv": f"{env['csv']}/valid_{{fold}}.csv", **dotted}
    return load_config(part, f"configs/{part}.yml", overrides="configs/tiny.yml", channels=SUBSET,
                       shards=env["store"], logdir=str(logdir), dotted=d)


def weights(path):
    return ckpt.load(path)["model_state_dict"]


def split_head(model_or_sd, head):
    sd = model_or_sd if isinstance(model_or_sd, dict) else model_or_sd.state_dict()
    return ({k: v for k, v in sd.items() if k not in head}, {k: v for k, v in sd.items() if k in head})


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def control(env):
    """One uninterrupted control run; the same command killed after epoch 1 (end of
    stage0), resumed and killed after epoch 3 (inside stage1: optimizer, scheduler
    and loader epoch must carry over), then resumed to the end."""
    whole, killed = env["root"] / "whole", env["root"] / "killed"
    r = run_cli(cli_args(env, whole))
    assert r.returncode == 0, r.stderr[-3000:]
    run = f"control/{SUBSET}/test_resnet"
    k = run_cli(cli_args(env, killed), {KILL_ENV: "1"})
    assert k.returncode == -signal.SIGKILL, k.stderr[-3000:]
    after_stage0 = weights(killed / run / "checkpoints" / "last.pth")
    k = run_cli(cli_args(env, killed), {KILL_ENV: "3"})
    assert k.returncode == -signal.SIGKILL, k.stderr[-3000:]
    assert "resuming after epoch 1" in k.stdout
    resumed = run_cli(cli_args(env, killed))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return {"whole": whole / run, "killed": killed / run, "after_stage0": after_stage0,
            "stdout": r.stdout, "resumed_stdout": resumed.stdout}


def test_control_writes_the_layout(control):
    d = control["whole"]
    for f in ("checkpoints/best.pth", "checkpoints/last.pth", "checkpoints/finished.json",
              "config.yml", "metrics.jsonl", "curves.png"):
        assert (d / f).is_file(), f
    hist = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert [h["stage"] for h in hist] == ["stage0"] + ["stage1"] * 6
    assert all(h["n_valid_sites"] == 2 * h["n_valid_wells"] for h in hist)   # both sites per well
    assert hist[0]["precision"] == ("bf16" if cpu_has_native_bf16() else "fp32")   # amp: auto
    best = ckpt.load(str(d / "checkpoints/best.pth"))
    # chosen among the last stage's epochs only, as catalyst did
    stage1 = [h for h in hist if h["stage"] == "stage1"]
    assert best["stage"] == "stage1" and best["epoch"] >= 2
    assert best["metrics"]["valid_accuracy03"] == max(h["valid_accuracy03"] for h in stage1)
    assert all(h["optimizer_steps"] >= 1 and h["samples"] > 0 for h in hist)
    assert not list(d.rglob("*.tmp*"))


def test_control_learns(control):
    hist = [json.loads(x) for x in (control["whole"] / "metrics.jsonl").read_text().splitlines()]
    # 4 control siRNAs in the tiny data: chance is 0.25 top-1 on held-out experiments
    assert hist[-1]["valid_accuracy01"] >= 0.5, [h["valid_accuracy01"] for h in hist]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"] - 0.5


def test_stage0_changes_only_the_head(control, env):
    cfg = config(env, "control", env["root"] / "unused")
    ckpt.seed_everything(cfg.args.seed)
    init = build_model(cfg, for_init=True)
    head = head_parameter_names(init)
    params = {n for n, _ in init.named_parameters()}
    init_body, init_head = split_head(init, head)
    body, head_w = split_head(control["after_stage0"], head)
    weights_of = lambda sd: {k: v for k, v in sd.items() if k in params}   # noqa: E731
    stats_of = lambda sd: {k: v for k, v in sd.items() if k.endswith("running_mean")}  # noqa: E731
    assert same(weights_of(body), weights_of(init_body))   # backbone weights frozen
    assert not same(head_w, init_head)
    # ... but its BatchNorm stayed in train mode, as in the reference: statistics moved
    a, b = stats_of(body), stats_of(init_body)
    assert a and all(not torch.equal(a[k], b[k]) for k in a)


def test_control_reads_both_sites_of_every_well(control, env):
    from shards import open_store
    from train.data import selections
    cfg = config(env, "control", env["root"] / "unused")
    n_wells = len(selections(cfg, open_store(env["store"]).sites)[0])
    hist = [json.loads(x) for x in (control["whole"] / "metrics.jsonl").read_text().splitlines()]
    assert all(h["samples"] == 2 * n_wells for h in hist)


def test_resume_after_kill_is_exact(control):
    a = weights(control["whole"] / "checkpoints/last.pth")
    b = weights(control["killed"] / "checkpoints/last.pth")
    assert same(a, b)
    assert "resuming after epoch 3" in control["resumed_stdout"]
    ha = (control["whole"] / "metrics.jsonl").read_text().splitlines()
    hb = (control["killed"] / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["valid_loss"] for x in ha] == [json.loads(x)["valid_loss"] for x in hb]


def test_stage1_changes_the_backbone(control):
    head = {"fc.weight", "fc.bias"}
    body0, _ = split_head(control["after_stage0"], head)
    body1, _ = split_head(weights(control["whole"] / "checkpoints/last.pth"), head)
    assert not same(body0, body1)


def test_finished_run_is_skipped(control, env):
    last = control["whole"] / "checkpoints/last.pth"
    before = last.stat().st_mtime_ns
    r = run_cli(cli_args(env, control["whole"].parents[2]))
    assert r.returncode == 0 and "skipping" in r.stdout
    assert last.stat().st_mtime_ns == before


def test_changed_config_is_refused_on_skip_and_on_resume(control, env, tmp_path):
    logdir = control["whole"].parents[2]
    r = run_cli(cli_args(env, logdir, extra=["--stages.data_params.batch_size=8"]))
    assert r.returncode == 2, r.stderr[-2000:]
    assert "stages.data_params.batch_size: 16 there, 8 now" in r.stderr
    assert "new --logdir" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # where and how it runs may change
    ok = run_cli(cli_args(env, logdir, extra=["--stages.data_params.num_workers=1"]))
    assert ok.returncode == 0 and "skipping" in ok.stdout
    # a run that stopped before finishing (its marker gone): resumed only if unchanged
    import shutil
    copy = tmp_path / "logs" / "control" / SUBSET / "test_resnet"
    shutil.copytree(control["whole"], copy)
    (copy / "checkpoints" / "finished.json").unlink()
    with pytest.raises(ConfigError, match="args.seed: 0 there, 1 now"):
        fit(config(env, "control", tmp_path / "logs", **{"args.seed": 1}))
    out = fit(config(env, "control", tmp_path / "logs"))      # nothing left: marks it finished
    assert not out["skipped"] and (copy / "checkpoints" / "finished.json").is_file()


def test_divergence_stops_in_one_line_and_saves_nothing_of_that_epoch(env, tmp_path):
    r = run_cli(cli_args(env, tmp_path, extra=[
        "--stages.stage1.optimizer_params.lr=1e9", "--stages.stage1.scheduler_params.lr_range=[1e9,1e9]",
        "--stages.stage1.state_params.num_epochs=2"]))
    assert r.returncode == 2, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: training diverged: control stage1 epoch 2")
    assert "batch" in lines[0] and "loss" in lines[0]
    run = tmp_path / "control" / SUBSET / "test_resnet"
    assert ckpt.load(str(run / "checkpoints/best.pth"))["epoch"] == 1     # stage0's, not epoch 2's
    assert ckpt.load(str(run / "checkpoints/last.pth"))["epoch"] == 1
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert not (run / "checkpoints/finished.json").exists()


def test_truncated_shard_stops_in_one_line(env, tmp_path):
    import glob
    import shutil
    store = tmp_path / "store"
    shutil.copytree(env["store"], store)
    tars = sorted(glob.glob(str(store / "**" / "*.tar"), recursive=True))
    victim = tars[len(tars) // 2]
    size = os.path.getsize(victim)
    with open(victim, "r+b") as f:
        f.truncate(size // 2)
    args = cli_args(env, tmp_path / "logs")
    args[args.index("--shards") + 1] = str(store)
    r = run_cli(args)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert os.path.basename(victim) in lines[0], lines[0]


def test_train_csv_sirna_out_of_range_is_an_error_naming_the_row(env, tmp_path):
    from shards import open_store
    from train.data import selections
    df = pd.read_csv(f"{env['csv']}/train_0.csv")
    df.loc[3, "sirna"] = 5000
    df.to_csv(tmp_path / "train_0.csv", index=False)
    cfg = config(env, "finetune", tmp_path / "logs",
                 **{"stages.data_params.train_csv": str(tmp_path / "train_{fold}.csv")})
    with pytest.raises(ConfigError, match=r"train_0.csv, row 4 \(id_code .*\): sirna 5000 is "
                                          r"neither a treatment"):
        selections(cfg, open_store(env["store"]).sites)


def test_finetune_starts_from_the_control_model(control, env):
    logdir = env["root"] / "ft"
    cfg = config(env, "finetune", logdir, **{
        "args.pretrained_control": str(control["whole"] / "checkpoints/best.pth"),
        "stages.stage1.state_params.num_epochs": 0})          # stage0 only: backbone frozen
    out = fit(cfg)
    run = logdir / "finetune" / SUBSET / "fold_0" / "test_resnet"
    assert (run / "checkpoints/best.pth").is_file() and (run / "metrics.jsonl").is_file()
    ctl = weights(control["whole"] / "checkpoints/best.pth")
    head = head_parameter_names(out["model"])
    ft_body, ft_head = split_head(weights(run / "checkpoints/last.pth"), head)
    ctl_body, ctl_head = split_head(ctl, head)
    params = {n for n, _ in out["model"].named_parameters()}
    assert same({k: v for k, v in ft_body.items() if k in params},       # frozen backbone weights
                {k: v for k, v in ctl_body.items() if k in params})
    assert ft_head["fc.weight"].shape[0] == 1108 and ctl_head["fc.weight"].shape[0] == 31

    model, rc = load_for_inference(str(run / "checkpoints/best.pth"))
    assert not model.training
    assert (rc["stage"], rc["fold"], rc["channels"], rc["num_classes"], rc["n_channels"]) == \
        ("finetune", 0, [1, 2, 3, 4, 5], 1108, 5)
    assert (rc["model_name"], rc["image_size"], rc["norm"], rc["label_offset"]) == ("test_resnet", 64, "site", 0)
    with torch.no_grad():
        assert model(torch.zeros(2, 5, 64, 64)).shape == (2, 1108)
    _, rc_ctl = load_for_inference(str(control["whole"] / "checkpoints/best.pth"))
    assert rc_ctl["fold"] is None and rc_ctl["label_offset"] == 1108 and rc_ctl["num_classes"] == 31


def test_control_of_another_channel_count_is_an_error(control, env):
    cfg = config(env, "finetune", env["root"] / "bad", **{
        "args.pretrained_control": str(control["whole"] / "checkpoints/best.pth")})
    cfg4 = load_config("finetune", "configs/finetune.yml", overrides="configs/tiny.yml",
                       channels="[1,2,3,4]", shards=env["store"], logdir=str(env["root"] / "bad"),
                       dotted={"args.pretrained_control": cfg.args.pretrained_control,
                               "stages.data_params.train_csv": cfg.stages.data_params.train_csv,
                               "stages.data_params.valid_csv": cfg.stages.data_params.valid_csv})
    with pytest.raises(ConfigError, match=r"trained on 5 channels \[1, 2, 3, 4, 5\]; this run uses 4"):
        fit(cfg4)
    missing = config(env, "finetune", env["root"] / "nothing_here")
    with pytest.raises(ConfigError, match="train it first"):
        fit(missing)


def test_pseudo_trains_on_pseudo_labelled_test_wells(control, env):
    from shards import open_store
    sites = open_store(env["store"]).sites
    test_wells = sites[(sites["split"] == "test") & (sites["well_type"] == "treatment")].drop_duplicates("id_code")
    pdir = env["root"] / "pseudo_csv"
    pdir.mkdir()
    train = pd.read_csv(f"{env['csv']}/train_0.csv")
    pseudo = pd.DataFrame({"id_code": test_wells["id_code"], "experiment": test_wells["experiment"],
                           "plate": test_wells["plate"], "well": test_wells["well"],
                           "sirna": [i % 12 for i in range(len(test_wells))],
                           "experiment_type": test_wells["cell_type"], "dataset": "test"})
    pd.concat([train, pseudo]).to_csv(pdir / "train_0.csv", index=False)
    pd.read_csv(f"{env['csv']}/valid_0.csv").to_csv(pdir / "valid_0.csv", index=False)
    logdir = env["root"] / "ps"
    cfg = config(env, "pseudo", logdir, **{
        "args.pretrained_control": str(control["whole"] / "checkpoints/best.pth"),
        "stages.data_params.train_csv": str(pdir / "train_{fold}.csv"),
        "stages.data_params.valid_csv": str(pdir / "valid_{fold}.csv"),
        "stages.stage1.state_params.num_epochs": 1})
    out = fit(cfg)
    run = logdir / "pseudo" / SUBSET / "fold_0" / "test_resnet"
    assert (run / "checkpoints/best.pth").is_file() and (run / "curves.png").is_file()
    assert out["history"][0]["samples"] == len(train) + len(pseudo)  # one site per well


TORCHRUN_SCRIPT = """
import sys, torch
from train.config import load_config
from train.recipe import fit
store, csv, logdir, out = sys.argv[1:5]
cfg = load_config("control", "configs/control.yml", overrides="configs/tiny.yml", channels="[1,2,3,4,5]",
                  shards=store, logdir=logdir, dotted={
                      "stages.data_params.valid_csv": csv + "/valid_{fold}.csv",
                      "stages.data_params.batch_size": 8,
                      "stages.stage1.state_params.num_epochs": 1})
res = fit(cfg)
torch.distributed.barrier()
rank = torch.distributed.get_rank()
torch.save({"state": res["model"].state_dict(), "history": res["history"]}, f"{out}/rank{rank}.pt")
"""


def test_torchrun_two_cpu_ranks_stay_identical(env, tmp_path):
    script = tmp_path / "ddp_fit.py"
    script.write_text(TORCHRUN_SCRIPT)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", str(script), env["store"],
                        env["csv"], str(tmp_path / "logs"), str(tmp_path)], cwd=REPO,
                       env=dict(os.environ, OMP_NUM_THREADS="1",
                                PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    a, b = (torch.load(tmp_path / f"rank{i}.pt", weights_only=False) for i in (0, 1))
    assert same(a["state"], b["state"]), [k for k in a["state"] if not torch.equal(a["state"][k], b["state"][k])]
    run = tmp_path / "logs" / "control" / SUBSET / "test_resnet"
    assert (run / "checkpoints/last.pth").is_file()
    hist = a["history"]
    assert len(hist) == 2 and hist[-1]["step"] > 0
    # each rank read its own half: together both sites of every training well, once
    from shards import open_store
    from train.data import selections
    one = config(env, "control", tmp_path / "single", **{
        "stages.data_params.batch_size": 8, "stages.stage1.state_params.num_epochs": 1})
    n_sites = 2 * len(selections(one, open_store(env["store"]).sites)[0])
    assert [h["samples"] for h in hist] == [n_sites, n_sites]
    # batch_size is global: one process on the same data takes the same optimizer steps
    # per epoch with the same samples per step
    single = fit(one)["history"]
    assert [h["optimizer_steps"] for h in single] == [h["optimizer_steps"] for h in hist]
    assert [h["samples"] for h in single] == [h["samples"] for h in hist]
    ckpt.seed_everything(one.args.seed)
    init = build_model(one, for_init=True)
    assert not same(init.state_dict(), a["state"])


def test_global_batch_must_divide_by_the_processes():
    from common.distributed import Dist
    from train.data import per_rank_batch
    assert per_rank_batch(64, Dist(0, 8, 0), "batch_size") == 8
    with pytest.raises(ConfigError, match="batch_size 30 is the global batch.*4 processes"):
        per_rank_batch(30, Dist(0, 4, 0), "batch_size")
