"""Every command line is checked whole before any work (common.cli), and every config layer
before it merges (train.config_shape): one `error:` line, exit 2, nothing written."""
import os
import subprocess
import sys

import pytest

from train.config import load_config
from train.config_schema import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def refused(*args, names=()):
    p = subprocess.run([sys.executable, "-m", *map(str, args)], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-2000:]
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def test_prep_shards_unknown_option_packs_nothing(tmp_path):
    out = tmp_path / "out"
    refused("prep", "shards", "--data-dir", tmp_path, "--out-dir", out, "--shard-size", 10,
            names=["--shard-size", "--shard-size-mb"])
    assert not out.exists()


def test_predict_all_mistyped_tta_writes_nothing(tmp_path):
    pred = tmp_path / "pred"
    for bad, name in ((("--ttaa", 8), "--ttaa"), (("--tta", "abc"), "--tta 'abc'")):
        refused("infer", "predict-all", "--shards", tmp_path, "--model-root", tmp_path,
                "--model-name", "m", "--out-dir", pred, *bad, names=[name])
    assert not pred.exists()


def test_ensemble_mistyped_flag_writes_nothing(tmp_path):
    out = tmp_path / "sub.csv"
    refused("infer", "ensemble", "--data-dir", tmp_path, "--predict-root", tmp_path,
            "--out", out, "--no-asign", names=["--no-asign", "--no-assign"])
    assert not out.exists()


@pytest.mark.parametrize("args, name", [
    (("data2",), "'data2'"),
    (("--full=banana",), "--full 'banana'"),
    (("--full", "--full"), "given twice"),
])
def test_verify_extra_argument_or_bad_bool(tmp_path, args, name):
    refused("prep", "verify", tmp_path, *args, names=[name])


@pytest.mark.parametrize("extra, name", [
    (("--fold", 0, "--fold", 1), "--fold 0 and --fold 1"),
    (("--stages.data_params.batch_size=8", "--stages.data_params.batch_size=4"),
     "--stages.data_params.batch_size"),
    (("--overrides", "configs/tiny.yml", "--overrides", "configs/plus.yml"), "--overrides"),
])
def test_train_option_given_twice(tmp_path, extra, name):
    refused("train", "finetune", "--logdir", tmp_path / "logs", *extra, names=[name, "twice"])
    assert not (tmp_path / "logs").exists()


def test_demo_and_bench_check_types_first(tmp_path):
    refused("demo", "--out-dir", tmp_path / "d", "--workers", "many", names=["--workers"])
    assert not (tmp_path / "d").exists()
    refused("bench.gpu_check", "--size", "big", "--work-dir", tmp_path / "g", names=["--size"])
    assert not (tmp_path / "g").exists()


def test_unknown_command_and_help_style():
    refused("infer", "predict", names=["'predict'", "predict-all"])
    p = subprocess.run([sys.executable, "-m", "infer", "ensemble", "--help"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.startswith("usage: python -m infer ensemble")
    assert "--no-assign" in p.stdout


def _yaml(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_overrides_of_the_wrong_shape_name_their_file(tmp_path):
    bad = _yaml(tmp_path, "bad.yml", "stages: 5\n")
    # before the fix a later file's stages mapping replaced the 5 and the run went on
    with pytest.raises(ConfigError, match=r"bad\.yml: stages must be a mapping"):
        load_config("finetune", "configs/finetune.yml", overrides=f"{bad},configs/tiny.yml")
    typed = _yaml(tmp_path, "typed.yml", "args:\n  progress: 'no'\n")
    with pytest.raises(ConfigError, match=r"typed\.yml: args.progress must be true or false"):
        load_config("finetune", "configs/finetune.yml", overrides=f"{typed},configs/tiny.yml")


def test_duplicate_yaml_key_names_file_and_lines(tmp_path):
    dup = _yaml(tmp_path, "dup.yml", "stages:\n  data_params:\n    batch_size: 8\n    batch_size: 4\n")
    with pytest.raises(ConfigError, match=r"dup\.yml: key 'batch_size' given twice .*lines 3 and 4"):
        load_config("finetune", "configs/finetune.yml", overrides=dup)


def test_config_directory_dali_without_workers_and_long_warmup(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config("finetune", str(tmp_path))
    with pytest.raises(ConfigError, match="backend dali needs .*num_workers >= 1"):
        load_config("finetune", "configs/finetune.yml", overrides="configs/tiny.yml",
                    dotted={"stages.data_params.backend": "dali"})
    with pytest.raises(ConfigError, match=r"warmup_steps=0"):
        load_config("finetune", "configs/finetune.yml", overrides="configs/tiny.yml",
                    dotted={"stages.stage1.scheduler_params.num_steps": 1})


def _make(*args):
    # STAMP= : no venv set-up step (the tests already run in it)
    return subprocess.run(["make", "STAMP=", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("target", ["synth", "folds", "shards", "verify", "train-control",
                                    "train-finetune", "predict", "ensemble", "demo", "map", "clean"])
def test_make_keeps_paths_with_spaces_whole(target):
    import shlex
    paths = {"DATA_DIR": "my data é", "OUT_DIR": "my out", "DEMO_OUT": "démo out"}
    p = _make("-n", target, *(f"{k}={v}" for k, v in paths.items()))
    assert p.returncode == 0, p.stderr
    words = shlex.split(p.stdout.replace("\\\n", " "))
    used = [w for w in words if any(v in w for v in paths.values())]
    assert used, p.stdout
    for w in used:   # every path arrived as one argument, never split at its space
        assert any(w.startswith(v) for v in paths.values()), (w, p.stdout)
    for v in paths.values():   # and no argument holds only the part before the space
        head = v.split(" ")[0]
        assert all(v in w for w in words if head in w.split("/")), (v, p.stdout)


def test_make_verify_reads_a_spaced_path(tmp_path):
    out = tmp_path / "my out é"
    out.mkdir()
    p = _make("verify", f"OUT_DIR={out}", f"PY={sys.executable}")
    assert p.returncode == 2
    assert f"error: {out}/manifest.json: no manifest" in p.stderr, p.stderr
