"""demo: reading the runs of a part through the run layout, and its option errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from common.run_layout import METRICS, run_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_run(logdir, part, channels, fold, model, accs):
    d = run_dir(str(logdir), part, channels, fold, model)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, METRICS), "w") as f:
        for epoch, (a1, a3) in enumerate(accs):
            f.write(json.dumps({"epoch": epoch, "valid_accuracy01": a1,
                                "valid_accuracy03": a3}) + "\n")


def test_runs_and_best_metrics_follow_the_run_layout(tmp_path):
    from demo.__main__ import _best_metrics, _runs

    logs = tmp_path / "logs"
    _write_run(logs, "control", (1, 2, 3, 4, 5), None, "m", [(0.1, 0.2), (0.3, 0.5)])
    _write_run(logs, "finetune", (1, 2, 3, 4, 5), 0, "m", [(0.2, 0.4), (0.4, 0.6), (0.5, 0.6)])
    _write_run(logs, "finetune", (1, 2, 3, 5, 6), 1, "m", [(0.6, 0.8)])
    _write_run(logs, "finetune", (1, 2, 3, 5, 6), 1, "other", [(0.9, 0.9)])  # another model
    os.makedirs(logs / "finetune" / "[1,2,3,4,5]" / "fold_1" / "m")        # no metrics yet

    assert [label for label, _ in _runs(str(logs), "control", "m")] == ["[1,2,3,4,5]"]
    ft = list(_runs(str(logs), "finetune", "m"))
    assert [label for label, _ in ft] == ["[1,2,3,4,5]/fold_0", "[1,2,3,5,6]/fold_1"]
    assert [len(rows) for _, rows in ft] == [3, 1]
    # best epoch by top-3, ties to the earlier epoch: (0.4, 0.6) and (0.6, 0.8)
    m = _best_metrics(str(logs), "finetune", "m")
    assert m["runs"] == 2
    assert abs(m["valid_top1"] - 0.5) < 1e-12 and abs(m["valid_top3"] - 0.7) < 1e-12
    assert _best_metrics(str(logs), "pseudo", "m") == dict(runs=0, valid_top1=None,
                                                           valid_top3=None)


def test_demo_bad_options_are_one_line_and_exit_2(tmp_path):
    out = tmp_path / "demo_out"
    for args, needle in ((["--channels", "[1,2,3,4,9]"], "--channels"),
                         (["--folds", "0,7"], "--folds: fold 7 out of range"),
                         (["--layout", "zarr"], "--layout 'zarr': choose one of kaggle, release")):
        proc = subprocess.run([sys.executable, "-m", "demo", "--out-dir", str(out), *args],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
        assert not out.exists()  # nothing made before the options were checked


def test_demo_refuses_data_of_the_other_layout(tmp_path):
    data = tmp_path / "demo_out" / "data"
    data.mkdir(parents=True)
    (data / "synth.json").write_text(json.dumps({"preset": "demo", "layout": "kaggle"}))
    proc = subprocess.run([sys.executable, "-m", "demo", "--out-dir", str(tmp_path / "demo_out"),
                           "--layout", "release"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "holds the kaggle layout" in lines[0] and "--fresh" in lines[0]
    assert sorted(os.listdir(data)) == ["synth.json"]  # nothing else made


def test_demo_help_works():
    proc = subprocess.run([sys.executable, "-m", "demo", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PAGER="cat"))
    assert proc.returncode == 0 and "--channels" in proc.stdout + proc.stderr  # fire: stderr off a tty
