"""make compare (bench/compare.py): its options, its plan and its table, on fake results
(the benchmark itself takes about an hour and is not run here)."""
import os
import subprocess
import sys

import pytest
import yaml

from bench.compare import (TECHNIQUES, _first, _plus, format_table, parse_techniques, plan,
                           plus_name, progressive_epochs, stage1_epochs, summarize,
                           technique_overlays)
from common.errors import BadInput
from train.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    return subprocess.run([sys.executable, "-m", "bench.compare", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_help_exits_0():
    out = _run("--help")
    assert out.returncode == 0 and "bench.compare" in out.stdout + out.stderr
    assert "--techniques" in out.stdout + out.stderr and "Traceback" not in out.stderr


def test_bad_technique_is_one_line_and_exit_2(tmp_path):
    out = _run("--techniques", "cutmix,nope", "--out-dir", str(tmp_path / "c"))
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "--techniques: unknown ['nope']" in lines[0]
    assert not (tmp_path / "c").exists()          # nothing made before the options are checked


def test_techniques_parse():
    assert parse_techniques("all") == list(TECHNIQUES) and parse_techniques("none") == []
    assert parse_techniques("cutmix,arcface") == ["cutmix", "arcface"]
    with pytest.raises(BadInput, match="unknown"):
        parse_techniques("mixup")


def test_plan_runs_the_recipes_per_seed_and_techniques_on_one():
    assert plan([0, 1], ["cutmix", "tta"], [0], first=False) == [
        ("reference", 0), ("plus", 0), ("+cutmix", 0), ("+tta", 0), ("reference", 1), ("plus", 1)]
    assert plan([0], ["tta"], [5], first=False) == [("reference", 0), ("plus", 0),
                                                    ("reference", 5), ("+tta", 5)]
    assert plan([0, 1], [], []) == [("reference", 0), ("plus", 0), ("first", 0),
                                    ("reference", 1), ("plus", 1), ("first", 1)]


def test_first_is_scaled_to_the_compare_budget(tmp_path):
    """make compare's first: the 1st place's cosine breaks (90, 150 of 130 epochs) and pseudo
    labels at the same shares of the reference's 30 epochs, its learning rates scaled as the
    demo scales the reference's (0.002 / 5e-4 = 4), six channels, no weights downloaded."""
    over = "configs/demo.yml,configs/compare.yml"
    p = tmp_path / "first.yml"
    p.write_text(yaml.safe_dump(_first(over)))
    cfg = load_config("finetune", "configs/finetune.yml", overrides=f"{over},{p}",
                      channels="[1,2,3,4,5,6]")
    s1 = cfg.stages.stage1
    assert s1.state_params.num_epochs == 30 and cfg.stages.stage0.state_params.num_epochs == 0
    assert s1.scheduler_params.segments == pytest.approx([6e-4, 21, 2.4e-4, 35, 0])
    assert cfg.stages.data_params.progressive_pseudo.start_epoch == 21
    assert (cfg.stages.data_params.image_size, cfg.stages.data_params.norm,
            cfg.model_params.pretrained, cfg.args.pretrained_control) == (64, "sample", "none", None)


@pytest.mark.parametrize("part,keys", [("norm", {"norm": "experiment"}),
                                       ("progressive_pseudo", {"progressive_pseudo": None}),
                                       ("augment", {"cutmix": None, "zoom": None, "jitter": None})])
def test_first_without_a_part_is_first_less_exactly_that_part(part, keys, tmp_path):
    """--first-without norm: the 1st place's recipe with the demo's normalization in place of
    per-sample statistics, everything else as first; it runs right after first on each seed."""
    over = "configs/demo.yml,configs/compare.yml"

    def data(overlay):
        p = tmp_path / "o.yml"
        p.write_text(yaml.safe_dump(overlay))
        cfg = load_config("finetune", "configs/finetune.yml", overrides=f"{over},{p}",
                          channels="[1,2,3,4,5,6]")
        return cfg.to_dict()
    full, less = data(_first(over)), data(_first(over, part))
    fd, ld = full["stages"]["data_params"], less["stages"]["data_params"]
    assert {k: ld[k] for k in keys} == keys and all(fd[k] not in (None, "experiment") for k in keys)
    assert {k: v for k, v in ld.items() if k not in keys} == \
        {k: v for k, v in fd.items() if k not in keys}
    assert less["model_params"] == full["model_params"]
    assert plan([0], [], [], first_without=[part]) == [("reference", 0), ("plus", 0),
                                                       ("first", 0), (f"first-{part}", 0)]
    out = _run("--first-without", "mixup", "--out-dir", str(tmp_path / "c"))
    assert out.returncode == 2 and "--first-without: unknown ['mixup']" in out.stderr


@pytest.mark.parametrize("name", [t for t in TECHNIQUES])
def test_each_technique_overlay_is_a_valid_config_on_the_demo(name, tmp_path):
    p = tmp_path / f"{name}.yml"
    p.write_text(yaml.safe_dump(technique_overlays()[name]))
    cfg = load_config("finetune", "configs/finetune.yml", overrides=f"configs/demo.yml,{p}")
    on = cfg.to_dict()
    off = load_config("finetune", "configs/finetune.yml", overrides="configs/demo.yml").to_dict()
    assert on != off and on["model_params"]["model_name"] == "resnet18"


@pytest.mark.parametrize("overrides", ["configs/demo.yml", "configs/demo.yml,configs/demo_long.yml"])
def test_progressive_labels_fit_the_runs_stage1(overrides, tmp_path):
    """The plus overlay's progressive pseudo labels start at the 1st place's 90/130 of stage1,
    so they run within the demo's (or the long demo's) epochs."""
    epochs = stage1_epochs(overrides)
    assert epochs == (15 if "long" in overrides else 5)
    assert progressive_epochs(5) == {"start_epoch": 3}
    assert progressive_epochs(15) == {"start_epoch": 10} and progressive_epochs(1) == {"start_epoch": 1}
    p = tmp_path / "plus.yml"
    p.write_text(yaml.safe_dump(technique_overlays(epochs)["progressive_pseudo"]))
    cfg = load_config("finetune", "configs/finetune.yml", overrides=f"{overrides},{p}")
    pp = cfg.stages.data_params.to_dict()["progressive_pseudo"]
    assert pp["start_epoch"] == round(90 / 130 * epochs)
    assert 1 <= pp["start_epoch"] < cfg.stages.stage1.state_params.num_epochs


def test_plus_without_drops_exactly_those_techniques(tmp_path):
    """--plus-without cutmix,zoom,progressive_pseudo: the plus overlay less those three, a
    valid config whose other techniques stay as plus.yml has them."""
    without = ("cutmix", "zoom", "progressive_pseudo")
    assert plus_name(without) == "plus-cutmix-zoom-progressive_pseudo" and plus_name() == "plus"
    p = tmp_path / "v.yml"
    p.write_text(yaml.safe_dump(_plus(5, without)))
    v = load_config("finetune", "configs/finetune.yml", overrides=f"configs/demo.yml,{p}")
    p.write_text(yaml.safe_dump(_plus(5)))
    full = load_config("finetune", "configs/finetune.yml", overrides=f"configs/demo.yml,{p}")
    vd, fd = v.stages.data_params.to_dict(), full.stages.data_params.to_dict()
    assert [vd[t] for t in without] == [None, None, None] and all(fd[t] for t in without)
    assert vd["jitter"] == fd["jitter"] and vd["controls_as_classes"] is True
    assert v.model_params.to_dict() == full.model_params.to_dict()
    assert plan([3], [], [], plus_name(without), first=False) == [("reference", 3),
                                                                 (plus_name(without), 3)]
    out = _run("--plus-without", "all", "--out-dir", str(tmp_path / "c"))
    assert out.returncode == 2 and "--plus-without: that leaves nothing" in out.stderr
    out = _run("--plus-without", "mixup", "--out-dir", str(tmp_path / "c"))
    assert out.returncode == 2 and "--plus-without: unknown ['mixup']" in out.stderr
    assert not (tmp_path / "c").exists()


def fake_runs():
    runs = []
    for seed, (ref, plus) in enumerate([(0.60, 0.80), (0.70, 0.84), (0.68, 0.86)]):
        runs.append({"recipe": "reference", "seed": seed, "no_assignment": ref - 0.1,
                     "plate_assignment": ref, "wells": 100, "seconds": 100.0})
        runs.append({"recipe": "plus", "seed": seed, "no_assignment": plus - 0.1,
                     "plate_assignment": plus, "wells": 100, "seconds": 200.0})
    runs.append({"recipe": "+cutmix", "seed": 0, "no_assignment": 0.5, "plate_assignment": 0.65,
                 "wells": 100, "seconds": 120.0})
    return runs


def test_summary_means_sds_and_deltas():
    s = {r["recipe"]: r for r in summarize(fake_runs())}
    assert s["plus"]["delta"] == pytest.approx([0.20, 0.14, 0.18])
    assert s["+cutmix"]["delta"] == pytest.approx([0.05]) and s["reference"]["delta"] == []
    assert s["plus"]["seconds"] == 200.0


def test_table_on_fake_results():
    results = {"config": {"preset": "demo", "model": "resnet18", "channels": ["[1,2,3,4,5]"],
                          "folds": [0]}, "machine": "a test host", "runs": fake_runs()}
    table = format_table(results).splitlines()
    rows = {line.split("|")[1].strip(): line for line in table if line.startswith("| ")}
    # mean ± sd (sample sd) over the three seeds; Δ against the reference on the same seeds
    assert "| 0.660 ± 0.053 |" in rows["reference"]
    assert "| 0.833 ± 0.031 |" in rows["plus"] and "+0.173 ± 0.031" in rows["plus"]
    assert "| 0.650 |" in rows["+cutmix"] and "+0.050" in rows["+cutmix"]
    assert "| 0,1,2 |" in rows["plus"] and "200 s" in rows["plus"]
    assert table[-1] == "Measured on: a test host"
