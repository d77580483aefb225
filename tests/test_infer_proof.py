"""Checkpoints and predictions prove what they are (issue 20, kind 2).

A digest of a checkpoint's tensors is checked on every load; the checkpoint must
be of the part and class count its run folder says; predict-all refuses an
unfinished run unless --allow-unfinished; a prediction records the digest of its
checkpoint and is redone (predict-all) or refused (ensemble) when it changed.
"""
import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pandas as pd
import pytest
import torch

from common.errors import BadInput
from train import checkpoint as ckpt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "test_resnet"
RUN = os.path.join("[1,2,3,4,5]", "fold_0", MODEL)


def _dotted(tmp):
    return {"stages.data_params.image_size": 32, "stages.stage1.state_params.num_epochs": 0,
            "args.progress": False,
            "stages.data_params.train_csv": f"{tmp}/csv/train_{{fold}}.csv",
            "stages.data_params.valid_csv": f"{tmp}/csv/valid_{{fold}}.csv"}


def _train(part, logdir, tiny_store, tmp):
    import train

    train.run(part, os.path.join(REPO, "configs", f"{part}.yml"),
              fold=None if part == "control" else 0, dotted=_dotted(tmp),
              overrides=os.path.join(REPO, "configs", "tiny.yml"), channels=[1, 2, 3, 4, 5],
              logdir=str(logdir), shards=tiny_store)


@pytest.fixture(scope="module")
def logs(tiny_data, tiny_store, tmp_path_factory):
    """LOGS with a control run (Part I, 31 classes) and a finetune fold-0 run, both tiny."""
    from prep.folds import write_folds

    tmp = tmp_path_factory.mktemp("proof_logs")
    write_folds(tiny_data, n_folds=5, out_dir=str(tmp / "csv"))
    _train("control", tmp / "logs", tiny_store, tmp)
    _train("finetune", tmp / "logs", tiny_store, tmp)
    return tmp / "logs"


@pytest.fixture
def root(logs, tmp_path):
    """A private copy of the finetune model root, to damage."""
    shutil.copytree(logs / "finetune", tmp_path / "finetune")
    return tmp_path / "finetune"


def cli(*args):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "infer", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True)


def predict_args(tiny_store, root, out, *more):
    return ("predict-all", "--shards", tiny_store, "--model-root", root, "--model-name", MODEL,
            "--out-dir", out, "--backend", "torch", *more)


def one_line_error(res) -> str:
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    lines = [x for x in res.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


def _zero_inside_weights(path, n=64):
    """Zero `n` bytes in the middle of the largest tensor stored in a torch zip file."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = np.frombuffer(f.read(4), "<u2")
        start = info.header_offset + 30 + int(name_len) + int(extra_len)
        f.seek(start + info.file_size // 2)
        f.write(bytes(n))


@pytest.mark.parametrize("damage", ["truncated", "zeroed"])
def test_a_damaged_checkpoint_is_one_line_in_predict_all(tiny_store, root, tmp_path, damage):
    best = root / RUN / "checkpoints" / "best.pth"
    if damage == "truncated":
        data = best.read_bytes()
        best.write_bytes(data[:len(data) - 100])
    else:
        _zero_inside_weights(best)
    out = tmp_path / "pred"
    line = one_line_error(cli(*predict_args(tiny_store, root, out)))
    assert str(best) in line and ("damaged" if damage == "zeroed" else "cannot be read") in line
    assert not out.exists()


def test_a_damaged_last_checkpoint_stops_a_resume_with_one_line(logs, tiny_store, tmp_path):
    shutil.copytree(logs, tmp_path / "logs")
    run = tmp_path / "logs" / "finetune" / RUN
    os.remove(run / "checkpoints" / "finished.json")
    _zero_inside_weights(run / "checkpoints" / "last.pth")
    before = (run / "checkpoints" / "best.pth").read_bytes()
    with pytest.raises(BadInput, match=r"last.pth is damaged"):
        _train("finetune", tmp_path / "logs", tiny_store, logs.parent)
    assert (run / "checkpoints" / "best.pth").read_bytes() == before


def test_a_control_checkpoint_copied_into_a_finetune_run_is_refused(logs, tiny_store, root,
                                                                  tmp_path):
    control = logs / "control" / "[1,2,3,4,5]" / MODEL / "checkpoints" / "best.pth"
    shutil.copy(control, root / RUN / "checkpoints" / "best.pth")
    out = tmp_path / "pred"
    line = one_line_error(cli(*predict_args(tiny_store, root, out)))
    assert "best.pth" in line and "part control" in line and "31 classes" in line
    assert not out.exists()


def test_an_unfinished_run_needs_allow_unfinished(tiny_store, root, tmp_path):
    os.remove(root / RUN / "checkpoints" / "finished.json")
    out = tmp_path / "pred"
    line = one_line_error(cli(*predict_args(tiny_store, root, out)))
    assert str(root / RUN) in line and "--allow-unfinished" in line
    assert not out.exists()
    res = cli(*predict_args(tiny_store, root, out, "--allow-unfinished"))
    assert res.returncode == 0, res.stderr
    meta = json.loads((out / RUN / "pred_test.json").read_text())
    assert meta["finished"] is False and meta["allow_unfinished"] is True


def _reweigh(best):
    """Save `best` again with other weights (a resumed run's new best)."""
    ck = ckpt.load(str(best))
    sd = ck["model_state_dict"]
    key = next(k for k, v in sd.items() if v.is_floating_point())
    sd[key] = sd[key] + 1.0
    ckpt.save({k: v for k, v in ck.items() if k != ckpt.DIGEST_KEY}, str(best))
    return ck[ckpt.DIGEST_KEY]


def test_a_prediction_is_redone_when_its_checkpoint_changes(tiny_store, tiny_data, root,
                                                            tmp_path, capsys):
    from infer.predict import predict_all

    out = tmp_path / "pred"
    predict_all(tiny_store, str(root), MODEL, str(out), data_dir=tiny_data, backend="torch")
    first = np.load(out / RUN / "pred_test.npy")
    meta = json.loads((out / RUN / "pred_test.json").read_text())
    best = root / RUN / "checkpoints" / "best.pth"
    old = _reweigh(best)
    assert meta["checkpoint_digest"] == old
    # the ensemble names the prediction and the checkpoint that changed under it
    with pytest.raises(BadInput, match=r"pred_test.npy was predicted from checkpoint .*best.pth "
                                       rf"with tensors {old[:12]}, but .* now holds"):
        from infer.ensemble import build
        build(tiny_data, str(out), model_root=str(root), quiet=True)
    capsys.readouterr()
    predict_all(tiny_store, str(root), MODEL, str(out), data_dir=tiny_data, backend="torch")
    assert "its checkpoint changed since" in capsys.readouterr().out
    meta = json.loads((out / RUN / "pred_test.json").read_text())
    assert meta["checkpoint_digest"] == ckpt.load(str(best))[ckpt.DIGEST_KEY] != old
    assert not np.array_equal(np.load(out / RUN / "pred_test.npy"), first)


def test_reordered_ids_are_refused_by_the_ensemble_and_redone_by_predict_all(
        tiny_store, tiny_data, root, tmp_path, capsys):
    from infer.ensemble import build
    from infer.predict import predict_all

    out = tmp_path / "pred"
    predict_all(tiny_store, str(root), MODEL, str(out), data_dir=tiny_data, backend="torch")
    ids_path = out / RUN / "ids_test.csv"
    ids = pd.read_csv(ids_path)
    ids.iloc[::-1].to_csv(ids_path, index=False)
    with pytest.raises(BadInput, match=r"ids_test.csv: not the ids written with"):
        build(tiny_data, str(out), quiet=True)
    capsys.readouterr()
    predict_all(tiny_store, str(root), MODEL, str(out), data_dir=tiny_data, backend="torch")
    assert "is not the one written with it; predicting again" in capsys.readouterr().out
    assert pd.read_csv(ids_path)["id_code"].tolist() == ids["id_code"].tolist()
    build(tiny_data, str(out), quiet=True)


def test_the_ensemble_refuses_a_part_one_prediction(tiny_data, tmp_path):
    from infer.ensemble import build
    from infer_fakes import write_pred

    test = pd.read_csv(os.path.join(tiny_data, "test.csv"))
    d = write_pred(tmp_path / "pred", "[1,2,3,4,5]", 0, MODEL,
                   np.zeros((len(test), 1108), np.float32), test["id_code"])
    with open(os.path.join(d, "pred_test.json"), "w") as f:
        json.dump({"stage": "control", "trained_classes": 31, "checkpoint": "x/best.pth"}, f)
    with pytest.raises(BadInput, match=r"pred_test.npy: predicted by a Part I control checkpoint"):
        build(tiny_data, str(tmp_path / "pred"), quiet=True)


def test_a_checkpoint_without_a_digest_loads_with_a_warning(tmp_path, capsys):
    path = str(tmp_path / "old.pth")
    sd = torch.nn.Linear(3, 2).state_dict()
    torch.save({"format": ckpt.FORMAT, "format_version": 1, "model_state_dict": sd}, path)
    ck = ckpt.load(path)
    assert "no digest of its tensors" in capsys.readouterr().err
    assert ck[ckpt.DIGEST_KEY] == ckpt.tensors_digest({"model_state_dict": sd})
    assert torch.equal(ck["model_state_dict"]["weight"], sd["weight"])


def test_a_checkpoint_cut_near_its_end_is_a_checkpoint_error(tmp_path):
    """Cut inside the zip's central directory torch raises OSError (EINVAL), not RuntimeError."""
    path = str(tmp_path / "best.pth")
    ckpt.save({"model_state_dict": torch.nn.Linear(30, 31).state_dict()}, path)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) - 10])
    with pytest.raises(ckpt.CheckpointError, match=r"best.pth cannot be read .*re-train the run"):
        ckpt.load(path)
