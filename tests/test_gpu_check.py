"""`make gpu-check` without a GPU: the CPU parts run on a small store, one line says the
GPU parts were skipped, exit 0; and the GPU parts' code is rehearsed on the CPU (CPU
stands in for the GPU, gloo for NCCL) so the one GPU run does not die on a typo."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("nvidia.dali")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--model", "test_resnet", "--batch", "8", "--steps", "2", "--warmup", "1",
         "--predict-wells", "8", "--workers", "2"]


@pytest.fixture(scope="module")
def cpu_run(tiny_store, tmp_path_factory):
    work = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")   # as on a machine without a GPU
    out = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--store", tiny_store,
                          *SMALL, "--work-dir", str(work / "w"), "--out", str(work / "r.json")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    results = json.loads((work / "r.json").read_text()) if (work / "r.json").exists() else None
    return out, results, work


def test_without_gpu_runs_the_cpu_parts_and_exits_0(cpu_run):
    out, r, _ = cpu_run
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    skipped = [line for line in out.stdout.splitlines() if "GPU parts skipped" in line]
    assert len(skipped) == 1
    assert r["gpu"] is None
    assert r["gpu_parts_skipped"] == ["agreement", "fp16_scaler", "ddp_nccl"]
    assert sorted(r["parts"]) == ["checkpoint", "loader", "predict", "train"]
    assert [k for k, v in r["parts"].items() if not v["ok"]] == []


def test_cpu_figures_and_capability(cpu_run):
    out, r, _ = cpu_run
    p = r["parts"]
    assert sorted(k for k in p["loader"] if k not in ("ok", "seconds")) == \
        ["dali-cpu", "raw-read", "torch"]
    for case in ("dali-cpu", "raw-read", "torch"):
        assert p["loader"][case]["per_s"] > 0 and p["loader"][case]["samples"] > 0
    assert p["train"]["synthetic_img_s"] > 0 and p["train"]["loader_fed_img_s"] > 0
    assert p["train"]["image_size"] == 64 and p["train"]["batch"] == 8
    assert p["predict"]["wells"] == 8 and p["predict"]["sites_per_well"] == 2.0
    assert os.path.isfile(p["checkpoint"]["path"])
    assert r["cpu_capability"] and r["cpu_capability"] in out.stdout
    assert "ratio loader-fed / synthetic" in out.stdout


def test_gpu_parts_rehearsed_on_the_cpu(cpu_run, tiny_store):
    from bench.gpu_check import rows
    from bench.gpu_ddp import ddp
    from bench.gpu_parts import Ctx, agreement, fp16_scaler
    _, r, work = cpu_run
    ctx = Ctx(store=tiny_store, work=str(work / "w"), size=64, batch=8, steps=2, warmup=1,
              model="test_resnet", workers=2, gpu=False)
    a = agreement(ctx, r["parts"]["checkpoint"]["path"])
    assert a["ok"], a
    assert a["uint8_dihedral"]["pixels_equal"] and a["uint8_no_augment"]["rows_equal"]
    assert a["deliver_native"]["max_abs_diff"] == 0.0
    assert a["logits"]["fp32_max_abs_diff"] == 0.0 and a["logits"]["argmax_agree"] == 1.0
    f = fp16_scaler(ctx, steps=2)
    assert f["ok"] and f["scaler_state_resumed"] and len(f["losses"]) == 4, f
    d = ddp(ctx, nproc=2)
    assert d["ok"] and d["world_size"] == 2 and d["backend"] == "gloo", d
    assert d["max_weight_diff_across_ranks"] == 0.0
    # The table prints every GPU figure from results shaped like a GPU run's.
    r = dict(r, parts=dict(r["parts"], agreement=a, fp16_scaler=f, ddp_nccl=d))
    text = "\n".join("  ".join(line) for line in rows(r))
    for figure in ("DALI GPU vs CPU uint8_dihedral", "deliver_native", "logits fp32",
                   "GradScaler", "gloo x2 max weight diff"):
        assert figure in text
