"""Trainer pieces that need no data: config checks, model surgery, schedules, well metrics."""
import numpy as np
import pandas as pd
import pytest
import torch

from common.well_logits import WellMeans
from train.config import ConfigError, load_config
from train.factory import create_model
from train.models import (classifier_name, first_conv_name, head_parameter_names, n_input_channels,
                          widen_first_conv)
from train.recipe import well_metrics
from train.schedule import make_optimizer, make_scheduler


# ------------------------------------------------------------------ config

@pytest.mark.parametrize("part", ["control", "finetune", "pseudo"])
def test_configs_carry_the_reference_values(part):
    cfg = load_config(part, f"configs/{part}.yml")
    dp, sp = cfg.stages.data_params, cfg.stages.state_params
    assert cfg.model_params.model == "cell_senet"
    assert cfg.model_params.model_name == "se_resnext50_32x4d"
    assert cfg.model_params.n_channels == 5 and cfg.channels == (1, 2, 3, 4, 5)
    assert cfg.model_params.num_classes == (31 if part == "control" else 1108)
    # accumulation as catalyst ran it: a step every batch (configured 2), every 3rd (configured 4)
    assert (dp.batch_size, sp.accumulation_steps) == ((32, 3) if part == "control" else (64, 1))
    assert dp.sites == ("two" if part == "control" else "random")
    assert cfg.model_params.pretrained == "imagenet" and cfg.model_params.drop_rate == 0.3
    assert (dp.channel_dropout, dp.shear_deg, dp.shear_p) == (0.5, 10.0, 0.5)
    assert sp.main_metric == "accuracy03" and sp.minimize_metric is False
    assert cfg.stages.criterion_params.criterion == "LabelSmoothingCrossEntropy"
    assert dp.image_size == 512 and dp.num_workers == 8 and dp.drop_last is False
    s0, s1 = cfg.stages.stage0, cfg.stages.stage1
    assert s0.freeze_backbone and not s1.freeze_backbone
    assert (s0.optimizer_params.optimizer, s0.optimizer_params.lr) == ("Nadam", 1e-3)
    assert s0.scheduler_params.to_dict() == {"scheduler": "MultiStepLR", "milestones": [10], "gamma": 0.3}
    assert s0.state_params.num_epochs == 2
    assert (s1.optimizer_params.optimizer, s1.optimizer_params.lr) == ("Nadam", 1e-4)
    n = 10 if part == "control" else 40
    assert s1.state_params.num_epochs == n
    assert s1.scheduler_params.to_dict() == {"scheduler": "OneCycleLR", "num_steps": n,
                                             "lr_range": [5e-4, 1e-5], "warmup_steps": 5,
                                             "momentum_range": [0.85, 0.95]}


def test_run_dir_layout_and_templates():
    cfg = load_config("finetune", "configs/finetune.yml", channels="[1,2,3,5,6]", fold=3,
                      logdir="LOGS", shards="STORE")
    assert cfg.run_dir == "LOGS/finetune/[1,2,3,5,6]/fold_3/se_resnext50_32x4d"
    assert cfg.stages.data_params.train_csv == "STORE/csv/train_3.csv"
    assert cfg.args.pretrained_control == "LOGS/control/[1,2,3,5,6]/se_resnext50_32x4d/checkpoints/best.pth"
    assert cfg.model_params.n_channels == 5
    ctl = load_config("control", "configs/control.yml", logdir="LOGS", channels=[2, 3, 4])
    assert ctl.run_dir == "LOGS/control/[2,3,4]/se_resnext50_32x4d"   # no fold level
    assert ctl.model_params.n_channels == 3
    pseudo = load_config("pseudo", "configs/pseudo.yml", shards="S", fold=1)
    assert pseudo.stages.data_params.train_csv == "S/csv/pseudo/train_1.csv"


def test_overrides_yaml_and_dotted_keys():
    cfg = load_config("control", "configs/control.yml", overrides="configs/tiny.yml",
                      dotted={"stages.data_params.batch_size": 8, "stages.stage1.scheduler_params.lr_range": [1e-3, 1e-5]})
    assert cfg.model_params.model_name == "test_resnet"
    assert cfg.stages.data_params.batch_size == 8 and cfg.stages.data_params.image_size == 64
    assert cfg.stages.stage1.scheduler_params.lr_range == [1e-3, 1e-5]
    assert cfg.stages.stage1.scheduler_params.warmup_steps == 1      # from tiny.yml
    with pytest.raises(AttributeError):
        cfg.args.seed = 3


@pytest.mark.parametrize("dotted, needle", [
    ({"stages.data_params.batch_szie": 8}, "batch_size"),            # typo: valid keys listed
    ({"model_params.n_channel": 5}, "n_channels"),
    ({"stages.stage1.scheduler_params.num_step": 3}, "num_steps"),
    ({"stages.stage1.optimiser_params.lr": 1}, "optimizer_params"),
    ({"stagez.x": 1}, "valid sections"),
    ({"stages.stage0.optimizer_params.lr": 0}, "lr must be > 0"),
    ({"stages.data_params.channels": [1, 2, 7]}, "outside 1-6"),
    ({"stages.data_params.channels": [1, 1, 2]}, "repeats"),
    ({"model_params.n_channels": 6}, "must agree"),
    ({"model_params.num_classes": 1108}, "31 classes"),
    ({"stages.data_params.sites": "both"}, "sites"),
    ({"stages.data_params.norm": "global"}, "norm"),
    ({"stages.state_params.main_metric": "map3"}, "main_metric"),
    ({"stages.stage1.scheduler_params.warmup_steps": 50}, "warmup_steps"),
])
def test_config_errors_name_the_key(dotted, needle):
    with pytest.raises(ConfigError) as e:
        load_config("control", "configs/control.yml", dotted=dotted)
    assert needle in str(e.value)


def test_reference_sites_list_form():
    cfg = load_config("finetune", "configs/finetune.yml", dotted={"stages.data_params.sites": [2]})
    assert (cfg.stages.data_params.sites, cfg.stages.data_params.site) == ("one", 2)
    cfg = load_config("finetune", "configs/finetune.yml", dotted={"stages.data_params.sites": [1, 2]})
    assert cfg.stages.data_params.sites == "two"


def test_typo_lists_valid_keys_and_part_mismatch():
    with pytest.raises(ConfigError, match=r"valid keys under stages.data_params: \[.*'batch_size'"):
        load_config("finetune", "configs/finetune.yml", dotted={"stages.data_params.batchsize": 1})
    with pytest.raises(ConfigError, match="part is 'control'"):
        load_config("finetune", "configs/control.yml")
    with pytest.raises(ConfigError, match="outside 1-6"):
        load_config("finetune", "configs/finetune.yml", channels="[0,1,2]")


def test_cli_rejects_typos_before_training(tmp_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "train", "finetune", "--config", "configs/finetune.yml",
                        "--stages.data_params.batch_sise=8", "--logdir", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "batch_sise" in r.stderr and "batch_size" in r.stderr
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------ models

def test_first_conv_widening_copies_and_repeats_rgb():
    torch.manual_seed(0)
    rgb = create_model("cell_timm", model_name="test_resnet", num_classes=10, n_channels=3)
    w3 = rgb.get_submodule(first_conv_name(rgb)).weight.detach().clone()
    widen_first_conv(rgb, 5)
    w5 = rgb.get_submodule(first_conv_name(rgb)).weight.detach()
    assert w5.shape[1] == 5 and n_input_channels(rgb) == 5
    assert torch.equal(w5[:, :3], w3)                 # RGB copied
    assert torch.equal(w5[:, 3], w3[:, 0]) and torch.equal(w5[:, 4], w3[:, 1])  # then repeated
    out = rgb(torch.randn(2, 5, 32, 32))
    assert out.shape == (2, 10)


def test_reference_names_map_to_timm_models():
    m = create_model("cell_senet", model_name="se_resnext50_32x4d", num_classes=31, n_channels=5)
    assert m.pretrained_cfg["architecture"] == "legacy_seresnext50_32x4d"   # the exact port
    assert n_input_channels(m) == 5 and m.get_classifier().out_features == 31
    assert head_parameter_names(m) == {"last_linear.weight", "last_linear.bias"}
    assert "layer0.conv1.weight" in m.state_dict()    # the reference's module names
    d = create_model("cell_densenet", num_classes=1108, n_channels=6)
    assert n_input_channels(d) == 6 and classifier_name(d) == "classifier"
    with pytest.raises(ValueError, match="unknown timm model"):
        create_model("cell_timm", model_name="resnet_does_not_exist", num_classes=2, n_channels=5)


@pytest.mark.parametrize("fmt", ["pth", "wrapped", "safetensors"])
def test_local_pretrained_file(tmp_path, fmt):
    import timm
    torch.manual_seed(1)
    src = timm.create_model("test_resnet", pretrained=False)        # an "ImageNet" RGB model
    sd = src.state_dict()
    path = tmp_path / f"w.{'safetensors' if fmt == 'safetensors' else 'pth'}"
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save({"state_dict": sd} if fmt == "wrapped" else sd, path)
    torch.manual_seed(2)
    m = create_model("cell_timm", model_name="test_resnet", num_classes=31, n_channels=5,
                     pretrained=str(path))
    own = m.state_dict()
    conv = first_conv_name(m) + ".weight"
    for k, v in sd.items():
        if k.startswith("fc."):
            continue
        if k == conv:
            assert torch.equal(own[k][:, :3], v) and torch.equal(own[k][:, 3:], v[:, :2])
        else:
            assert torch.equal(own[k], v), k
    assert own["fc.weight"].shape == (31, src.num_features)


def test_pretrained_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist.*none"):
        create_model("cell_timm", model_name="test_resnet", num_classes=3, n_channels=5,
                     pretrained=str(tmp_path / "missing.pth"))
    import timm
    torch.save(timm.create_model("resnet10t").state_dict(), tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="does not fit"):
        create_model("cell_timm", model_name="test_resnet", num_classes=3, n_channels=5,
                     pretrained=str(tmp_path / "other.pth"))
    with pytest.raises(ConfigError, match="weights file .*missing.pth does not exist"):
        load_config("control", "configs/control.yml",
                    dotted={"model_params.pretrained": str(tmp_path / "missing.pth")})


def test_imagenet_weights_unreachable_stop_naming_the_three_ways(tmp_path, monkeypatch):
    # Nothing cached and no hub: the stop comes before any training, in one line.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(ConfigError) as e:
        create_model("cell_timm", model_name="test_resnet", num_classes=3, n_channels=5,
                     pretrained="imagenet")
    msg = str(e.value)
    assert "cannot be had" in msg and "pretrained to a local RGB weights file" in msg
    assert "pretrained: none" in msg and "cache" in msg


def test_dropout_before_the_last_linear_in_train_mode_only():
    torch.manual_seed(0)
    m = create_model("cell_senet", model_name="se_resnext50_32x4d", num_classes=4, n_channels=5,
                     drop_rate=0.3)
    feats = torch.randn(8, m.num_features)
    m.train()
    a, b = m.forward_head(feats[:, :, None, None]), m.forward_head(feats[:, :, None, None])
    assert not torch.equal(a, b)                      # dropout active: two draws differ
    m.eval()
    c = m.forward_head(feats[:, :, None, None])
    assert torch.allclose(c, m.get_classifier()(feats), atol=1e-6)   # eval: Linear alone


# ------------------------------------------------------------------ schedules

def test_one_cycle_warmup_anneal_and_momentum():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = make_optimizer([p], "Nadam", lr=1e-4)
    sch = make_scheduler(opt, steps_per_epoch=10, scheduler="OneCycleLR", num_steps=4,
                         lr_range=[5e-4, 1e-5], warmup_steps=1, momentum_range=[0.85, 0.95])
    lrs, moms = [], []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        moms.append(opt.param_groups[0]["betas"][0])
        opt.step()
        sch.step()
    # momentum starts from the optimizer's own beta1 (0.9), as catalyst's warm-up did
    assert lrs[0] == pytest.approx(1e-4) and moms[0] == pytest.approx(0.9)
    assert max(lrs) == pytest.approx(5e-4) and lrs.index(max(lrs)) == 10   # end of warmup epoch
    assert moms[10] == pytest.approx(0.85)                                  # momentum inverse
    assert lrs[-1] == pytest.approx(1e-5) and moms[-1] == pytest.approx(0.95)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    state = sch.state_dict()
    opt2 = make_optimizer([p], "Nadam", lr=1e-4)
    sch2 = make_scheduler(opt2, 10, "OneCycleLR", num_steps=4, lr_range=[5e-4, 1e-5],
                          warmup_steps=1, momentum_range=[0.85, 0.95])
    sch2.load_state_dict(state)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_reference_schedule_facts():
    """The reference's stage1: 40 epochs x 450 batches, lr_range [5e-4, 1e-5], warm-up 5,
    momentum [0.85, 0.95], from Nadam lr 1e-4 (beta1 0.9)."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = make_optimizer([p], "Nadam", lr=1e-4)
    sch = make_scheduler(opt, steps_per_epoch=450, scheduler="OneCycleLR", num_steps=40,
                         lr_range=[5e-4, 1e-5], warmup_steps=5, momentum_range=[0.85, 0.95])
    lrs, moms = [], []
    for _ in range(40 * 450):
        lrs.append(opt.param_groups[0]["lr"])
        moms.append(opt.param_groups[0]["betas"][0])
        sch.step()
    lrs, moms = np.array(lrs).reshape(40, 450), np.array(moms).reshape(40, 450)
    assert lrs[0].mean() == pytest.approx(1.399e-4, rel=1e-3)
    assert lrs[5].mean() == pytest.approx(4.930e-4, rel=1e-3)
    assert lrs[39].mean() == pytest.approx(1.698e-5, rel=1e-3)
    assert moms[0, 0] == pytest.approx(0.900) and moms[1, 0] == pytest.approx(0.890)
    assert moms[5, 0] == pytest.approx(0.85) and moms[39, -1] == pytest.approx(0.95)


def test_accumulation_cadence_steps_every_nth_batch():
    """With accumulation_steps 3 (the reference's Part I as it ran), 10 batches give
    steps after batches 3, 6, 9 and 10 (the epoch's short last group)."""
    from common.distributed import Dist
    from train.recipe import train_one_epoch
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    batches = [(torch.randn(4, 3, 2, 2), torch.randint(0, 3, (4,)), torch.arange(4))
               for _ in range(10)]
    opt = make_optimizer(model.parameters(), "SGD", lr=0.1)
    sch = make_scheduler(opt, 4, "OneCycleLR", num_steps=2, lr_range=[0.1, 0.01], warmup_steps=1)
    snapshots = []
    orig = opt.step

    def step(*a, **k):
        snapshots.append(len(seen))
        return orig(*a, **k)
    opt.step = step
    seen = []

    class Loader(list):
        def __iter__(self):
            for b in list.__iter__(self):
                seen.append(1)
                yield b
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    from train.batch_step import BatchStep
    cfg = load_config("control", "configs/control.yml", overrides="configs/tiny.yml")
    out = train_one_epoch(model, Loader(batches), 10, opt, sch, scaler, BatchStep(cfg, model, None, 0),
                          3, torch.device("cpu"), None, False, Dist(), "test", False, 1e3)
    assert snapshots == [3, 6, 9, 10]
    assert out["optimizer_steps"] == 4 and out["samples"] == 40 and sch.step_count == 4


def test_amp_auto_is_fp32_on_a_cpu_without_native_bf16():
    from common.precision import amp_dtype, cpu_has_native_bf16
    cfg = load_config("control", "configs/control.yml", overrides="configs/tiny.yml")
    assert cfg.args.amp == "auto"
    dtype = amp_dtype(cfg.args.amp, torch.device("cpu"))
    assert dtype == (torch.bfloat16 if cpu_has_native_bf16() else None)
    demo = load_config("finetune", "configs/finetune.yml", overrides="configs/demo.yml")
    assert demo.args.amp == "auto" and demo.model_params.pretrained == "none"


# ------------------------------------------------------------------ validation metric

def test_well_metrics_average_the_two_sites():
    # Two wells, two sites each, read in two batches as the loader does (no repeats).
    sites = pd.DataFrame({"id_code": ["A_1_B02", "A_1_B02", "A_1_B03", "A_1_B03"]})
    from common.well_logits import well_index
    wells = ["A_1_B02", "A_1_B03"]
    labels = np.array([0, 2])
    # Well B02 (label 0): site 1 says class 1 weakly, site 2 class 0 strongly -> mean is class 0.
    logits = np.array([[0, 1, 0], [3, 0, 0], [0, 0, 2], [0, 0, 2]], np.float32)
    means = WellMeans(well_index(sites["id_code"].to_numpy(), wells), 2)
    means.add(np.array([0, 2]), logits[[0, 2]])
    means.add(np.array([1, 3]), logits[[1, 3]])
    m = well_metrics(means, labels)
    assert m["n_valid_wells"] == 2 and m["n_valid_sites"] == 4
    assert m["valid_accuracy01"] == 1.0
    expected = torch.nn.functional.cross_entropy(torch.tensor([[1.5, 0.5, 0], [0, 0, 2]]),
                                                 torch.tensor([0, 2])).item()
    assert m["valid_loss"] == pytest.approx(expected, rel=1e-6)
    # per-site voting would get site 1 of B02 wrong: with only that site the well is wrong
    one = WellMeans(well_index(sites["id_code"].to_numpy(), wells), 2)
    one.add(np.array([0, 2]), logits[[0, 2]])
    m3 = well_metrics(one, labels)
    assert m3["valid_accuracy01"] == 0.5 and m3["valid_accuracy03"] == 1.0
    # a well the loader never delivered is an error, not a silent 0
    empty = WellMeans(well_index(sites["id_code"].to_numpy(), wells), 2)
    empty.add(np.array([0]), logits[[0]])
    with pytest.raises(RuntimeError, match="1 validation wells got no site"):
        well_metrics(empty, labels)


# ------------------------------------------------------------------ CLI and re-runs

def test_config_paths_resolve_from_the_project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)     # neither configs/ file exists from here
    cfg = load_config("control", "configs/control.yml", overrides="configs/tiny.yml")
    assert cfg.model_params.model_name == "test_resnet"
    with pytest.raises(ConfigError, match="nope.yml does not exist"):
        load_config("control", "configs/nope.yml")


def test_cli_help_from_another_directory(tmp_path):
    import os
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "train", "control", "--help"], cwd=tmp_path,
                       env=dict(os.environ, PYTHONPATH=repo), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Part I" in r.stdout and "--channels" in r.stdout


def test_logdir_that_is_a_file_is_named(tmp_path):
    f = tmp_path / "logs"
    f.write_text("not a directory")
    with pytest.raises(ConfigError, match=r"args.logdir .*logs is a file"):
        load_config("control", "configs/control.yml", logdir=str(f))


def test_changed_keys_ignore_where_a_run_executes():
    from train.config import changed_keys
    a = load_config("finetune", "configs/finetune.yml", logdir="A").to_dict()
    harmless = load_config("finetune", "configs/finetune.yml", logdir="B", dotted={
        "stages.data_params.num_workers": 0, "args.progress": False, "args.device": "cpu"})
    assert changed_keys(a, harmless.to_dict()) == []
    other = load_config("finetune", "configs/finetune.yml", logdir="A", dotted={
        "stages.data_params.batch_size": 32, "args.seed": 1, "stages.stage1.optimizer_params.lr": 1e-3})
    assert [k for k, _, _ in changed_keys(a, other.to_dict())] == [
        "args.seed", "stages.data_params.batch_size", "stages.stage1.optimizer_params.lr"]
