"""Faults of the machine are one line (issue 20, kind 7): a full disk or a read-only output
exits 2 naming the file, with nothing half-written; Ctrl-C is one line, not a traceback."""
from __future__ import annotations

import errno
import os

import numpy as np
import pytest
import torch

from common.errors import run_cli
from infer_fakes import make_dataset, planted_logits, write_pred


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _raise(e):
    def f(*a, **k):
        raise e
    return f


@pytest.mark.parametrize("fault, needle", [
    (OSError(errno.ENOSPC, "No space left on device", "/out/x.csv"), "free space"),
    (OSError(errno.EROFS, "Read-only file system", "/out/x.csv"), "read-only"),
    (OSError(errno.EACCES, "Permission denied", "/out/x.csv"), "permissions")])
def test_run_cli_turns_a_machine_fault_into_one_line(capsys, fault, needle):
    with pytest.raises(SystemExit) as e:
        run_cli(_raise(fault))
    assert e.value.code == 2
    line = one_line(capsys)
    assert "cannot write /out/x.csv" in line and needle in line


def test_ctrl_c_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(_raise(KeyboardInterrupt()))
    assert e.value.code == 130
    assert "interrupted" in one_line(capsys)


def test_other_os_errors_keep_their_traceback():
    with pytest.raises(OSError):
        run_cli(_raise(OSError(errno.EIO, "I/O error")))


def test_a_checkpoint_on_a_full_disk_names_it_and_keeps_the_old_one(tmp_path, monkeypatch,
                                                                    capsys):
    import shards.atomic
    from train import checkpoint as ckpt

    path = str(tmp_path / "best.pth")
    ckpt.save({"model_state_dict": torch.nn.Linear(3, 2).state_dict()}, path)
    before = open(path, "rb").read()

    def full(name, mode="r", *a, **k):
        if "w" in mode:
            raise OSError(errno.ENOSPC, "No space left on device", name)
        return open(name, mode, *a, **k)
    monkeypatch.setattr(shards.atomic, "open", full, raising=False)
    with pytest.raises(SystemExit):
        run_cli(lambda: ckpt.save({"model_state_dict": torch.nn.Linear(3, 2).state_dict()}, path))
    assert f"cannot write {path}: No space left" in one_line(capsys)
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["best.pth"]


def test_ensemble_on_a_full_disk_leaves_no_part_of_a_submission(tmp_path, monkeypatch, capsys):
    from infer.__main__ import main

    data, pred = tmp_path / "data", tmp_path / "pred"
    test = make_dataset(data, group_size=10)["test"]
    write_pred(pred, "[1,2,3,4,5]", 0, "m", planted_logits(test["sirna"]), test["id_code"])
    out = tmp_path / "sub" / "submission.csv"
    monkeypatch.setattr(np, "save", _raise(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(SystemExit) as e:
        main(["ensemble", "--data-dir", str(data), "--predict-root", str(pred), "--out", str(out)])
    assert e.value.code == 2
    capsys.readouterr()  # the plate table went to stdout
    assert not os.listdir(out.parent)


def test_predict_all_refuses_a_read_only_out_dir_before_computing(tmp_path, monkeypatch, capsys):
    from infer.__main__ import main

    ck = tmp_path / "logs" / "[1,2,3,4,5]" / "fold_0" / "m" / "checkpoints"
    os.makedirs(ck)
    (ck / "best.pth").write_bytes(b"never read: the output is checked first")
    (ck / "finished.json").write_text("{}")
    out = tmp_path / "ro" / "pred"
    os.makedirs(out.parent)
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if str(p).startswith(str(out.parent))
                        else real(p, m))
    with pytest.raises(SystemExit) as e:
        main(["predict-all", "--shards", str(tmp_path / "nostore"), "--model-root",
              str(tmp_path / "logs"), "--model-name", "m", "--out-dir", str(out)])
    assert e.value.code == 2
    line = capsys.readouterr().err.strip()
    assert line == (f"error: cannot write {out}: Permission denied; check its permissions, or "
                    "choose an output you may write")
    assert not out.exists()
