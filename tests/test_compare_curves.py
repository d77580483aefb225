"""bench.compare_curves: every recipe's Part II curves of one seed of `make compare`."""
import json
import subprocess
import sys

import pytest

from bench.compare_curves import find_runs, main
from common.errors import BadInput


def _run_dir(seed_dir, recipe, accs, pseudo_from=None):
    d = seed_dir / "logs" / recipe / "finetune" / "[1,2,3,4,5]" / "fold_0" / "resnet18"
    d.mkdir(parents=True)
    lines = [{"epoch": e, "stage": "stage1", "valid_accuracy01": a, "train_loss": 5 - e,
              "lr": 1e-3 / (e + 1), "pseudo_labelled": 10 if pseudo_from and e >= pseudo_from else 0}
             for e, a in enumerate(accs)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_curves_read_every_recipe_in_table_order_and_plot(tmp_path, capsys):
    seed = tmp_path / "seed_0"
    _run_dir(seed, "first-norm", [0.1, 0.3])
    _run_dir(seed, "first", [0.1, 0.2, 0.4], pseudo_from=2)
    _run_dir(seed, "reference", [0.2, 0.5])
    (seed / "logs" / "control").mkdir()          # Part I: no finetune folder, not a recipe
    runs = find_runs(str(seed))
    assert list(runs) == ["reference", "first", "first-norm"]
    assert [h["valid_accuracy01"] for h in runs["first"]] == [0.1, 0.2, 0.4]
    out = tmp_path / "c.png"
    main(out_dir=str(tmp_path), seed=0, out=str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "first " in printed and "best valid top-1 0.400 (epoch 2)" in printed


def test_curves_without_runs_is_one_line(tmp_path):
    with pytest.raises(BadInput, match="no such folder"):
        find_runs(str(tmp_path / "seed_0"))
    (tmp_path / "seed_0" / "logs" / "reference").mkdir(parents=True)
    out = subprocess.run([sys.executable, "-m", "bench.compare_curves", "--out-dir", str(tmp_path),
                          "--out", str(tmp_path / "c.png")], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "metrics.jsonl" in out.stderr
    assert not (tmp_path / "c.png").exists()
