"""`make gpu-check`: every GPU path of the pipeline proven and measured in one short run.

On a machine with an NVIDIA GPU (written for one H200: 16 cores, one prepared
run of at most 8 minutes), in order:
  1. a store: one experiment of the `full` preset at 512 px (synth on all
     cores + prep shards; the bench store bench/out/loader_store1 is reused
     when present);
  2. agreement: GPU vs CPU DALI uint8 batches equal (flips and transposes are
     exact), the delivery step within 1e-5, a trained checkpoint's logits
     (train CLI -> train.load_for_inference) within bf16 tolerance;
  3. loader samples/s at 512 px, 5 channels, augmentation, global batch 64:
     DALI-GPU, DALI-CPU, the torch fallback, and the raw-read ceiling;
  4. training images/s, se_resnext50 at 512 px, bf16 autocast, channels-last:
     synthetic tensors on the GPU vs fed by the DALI-GPU loader (goal ratio >= 0.95);
  5. fp16 autocast + GradScaler: finite losses, scaler state saved and resumed;
  6. prediction wells/s with TTA 8 (infer's own predict pass);
  7. torchrun with NCCL, one process per GPU (2 where there are 2 or more):
     identical weights across ranks after a few DDP steps;
  8. bench/results_gpu.json and a printed table, with the host's CPU capability.

Without a GPU it runs the CPU parts (1, 3 without DALI-GPU, 4 and 6 with a
small model, the checkpoint of 2) on a small store (the `tiny` preset at
`--size 128`), says in one
line which GPU parts were skipped, and exits 0: `tests/test_gpu_check.py` runs
it that way so the script cannot rot.  A failing check is recorded with its
traceback and the run carries on (one GPU run must report everything); the
exit status is then 1.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
import traceback

import torch

from bench.full_store import OUT, REPO, STORE as BENCH_STORE
from bench.gpu_ddp import ddp, run_ddp_worker
from bench.gpu_parts import (Ctx, agreement, fp16_scaler, loader_throughput, predict_throughput,
                             train_checkpoint, train_throughput)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results_gpu.json")
# Defaults per machine kind: the GPU run is the one the issue sizes (8 minutes on an
# H200); the CPU run only keeps the script honest (under a minute on 2 cores).
GPU_DEFAULTS = dict(size=512, preset="full", model="se_resnext50_32x4d", batch=64, steps=20,
                    warmup=5, predict_wells=256)
CPU_DEFAULTS = dict(size=128, preset="tiny", model="test_resnet", batch=8, steps=2, warmup=1,
                    predict_wells=8)
GPU_PARTS = ("agreement", "fp16_scaler", "ddp_nccl")


def main(size: int | None = None, preset: str | None = None, store: str | None = None,
         model: str | None = None, batch: int | None = None, steps: int | None = None,
         warmup: int | None = None, predict_wells: int | None = None, workers: int | None = None,
         work_dir: str | None = None, out=RESULTS, ddp_worker: bool | str = False):
    """Prove and measure the GPU paths (CPU parts only without a GPU); writes bench/results_gpu.json.

    Args:
        size: image side of the synthetic store (default 512 with a GPU, 128 without).
        preset: synthetic preset (default full with a GPU: one experiment of it; tiny without:
            the tests' 10 experiments, 556 sites).
        store: a packed store to use instead of building one (its image side is the size).
        model: timm model of the throughput parts (default se_resnext50_32x4d; test_resnet on a CPU).
        batch: global batch (default 64; 8 on a CPU).
        steps: timed steps / batches per figure (default 20; 2 on a CPU).
        warmup: untimed steps before each figure (default 5; 1 on a CPU).
        predict_wells: wells read by the prediction figure (default 256; 8 on a CPU).
        workers: loader threads and synth/prep processes (default: all cores).
        work_dir: where the store, checkpoint and logs go (default bench/out/gpu_check).
        out: the results JSON (default bench/results_gpu.json).
        ddp_worker: internal: run as one torchrun process of the NCCL part (cuda, or cpu: gloo).
    """
    from common.errors import BadInput
    from common.precision import cpu_capability
    work = os.path.abspath(work_dir or os.path.join(OUT, "gpu_check"))
    if ddp_worker:
        return run_ddp_worker(work, "cpu" if ddp_worker == "cpu" else "cuda")
    gpu = torch.cuda.is_available()
    d = GPU_DEFAULTS if gpu else CPU_DEFAULTS
    size = int(size or d["size"])
    preset = preset or d["preset"]
    if preset not in ("full", "tiny", "demo"):
        raise BadInput(f"--preset {preset!r}: choose full, tiny or demo")
    if size < 32:
        raise BadInput(f"--size {size}: need at least 32 pixels")
    workers = int(workers or os.cpu_count() or 1)
    os.makedirs(work, exist_ok=True)
    if store is not None:
        from shards import open_store
        store, seconds = os.path.abspath(store), 0.0
        size = int(open_store(store).image_shape[0])
    else:
        store, seconds = ensure_store(work, preset, size, workers)
    ctx = Ctx(store=store, work=work, size=size, batch=int(batch or d["batch"]),
              steps=int(steps or d["steps"]), warmup=int(warmup or d["warmup"]),
              model=model or d["model"], workers=workers, gpu=gpu)
    results = {"host": host(), "cpu_capability": cpu_capability(), "cores": os.cpu_count(),
               "gpu": torch.cuda.get_device_name(0) if gpu else None,
               "gpus": torch.cuda.device_count(), "torch": torch.__version__,
               "store": {"path": os.path.relpath(store, REPO), "size": size, "preset": preset,
                         "build_seconds": seconds},
               "settings": {k: getattr(ctx, k) for k in ("size", "batch", "steps", "warmup",
                                                         "model", "workers")},
               "parts": {}}
    parts = results["parts"]
    checkpoint = run_part(parts, "checkpoint", lambda: {
        "path": train_checkpoint(ctx, image_size=min(128 if gpu else 64, size)), "ok": True})
    if gpu:
        run_part(parts, "agreement", lambda: agreement(ctx, parts["checkpoint"]["path"])
                 if checkpoint else skip("no checkpoint"))
    run_part(parts, "loader", lambda: loader_throughput(ctx))
    run_part(parts, "train", lambda: train_throughput(ctx))
    if gpu:
        run_part(parts, "fp16_scaler", lambda: fp16_scaler(ctx))
    run_part(parts, "predict", lambda: predict_throughput(ctx, int(predict_wells
                                                                   or d["predict_wells"])))
    if gpu:
        run_part(parts, "ddp_nccl", lambda: ddp(ctx))
    results["gpu_parts_skipped"] = [] if gpu else list(GPU_PARTS)
    write_results(results, out)
    print_table(results)
    if not gpu:
        print(f"GPU parts skipped (no CUDA device visible): {', '.join(GPU_PARTS)} and the "
              "DALI-GPU loader; ran the CPU parts only.")
    failed = [k for k, v in parts.items() if not v.get("ok")]
    if failed:
        print(f"FAILED: {', '.join(failed)} (details in {os.path.relpath(out, REPO)})")
        sys.exit(1)


def ensure_store(work: str, preset: str, size: int, workers: int) -> tuple[str, float]:
    """(store path, seconds to build it): the bench store when it fits, else one under `work`."""
    if preset == "full" and size == 512 and os.path.isfile(os.path.join(BENCH_STORE,
                                                                        "manifest.json")):
        return BENCH_STORE, 0.0
    data = os.path.join(work, f"data_{preset}_{size}")
    store = os.path.join(work, f"store_{preset}_{size}")
    t0 = time.perf_counter()
    if not os.path.isfile(os.path.join(data, "synth.json")):
        cmd = [sys.executable, "-m", "prep", "synth", "--out-dir", data, "--preset", preset,
               "--image-size", str(size), "--workers", str(workers)]
        if preset == "full":
            cmd += ["--experiments", "1"]
        subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    if not os.path.isfile(os.path.join(store, "manifest.json")):
        subprocess.run([sys.executable, "-m", "prep", "shards", "--data-dir", data,
                        "--out-dir", store, "--workers", str(workers)], cwd=REPO, check=True,
                       stdout=subprocess.DEVNULL)
    return store, time.perf_counter() - t0


def run_part(parts: dict, name: str, fn) -> bool:
    """Run one part, timed; a failure is recorded (with its traceback) and the run goes on."""
    print(f"[gpu-check] {name} ...", flush=True)
    t0 = time.perf_counter()
    try:
        result = fn()
    except Exception:   # noqa: BLE001 — a check harness: report every part, fail at the end
        tb = traceback.format_exc()
        print(tb, file=sys.stderr)
        result = {"ok": False, "error": tb.strip().splitlines()[-1], "traceback": tb}
    result["seconds"] = time.perf_counter() - t0
    parts[name] = result
    return bool(result.get("ok"))


def skip(why: str) -> dict:
    return {"ok": False, "error": f"not run: {why}"}


def host() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    return cpu


def write_results(results: dict, out: str) -> None:
    from shards.atomic import write_bytes
    write_bytes(out, json.dumps(results, indent=1, default=str))


def rows(results: dict) -> list[tuple[str, str, str, str]]:
    """(part, figure, value, goal) lines of the table."""
    p, out = results["parts"], []

    def ok(part):
        return "ok" if p.get(part, {}).get("ok") else "FAILED"
    if "checkpoint" in p:
        out.append(("checkpoint", "train control (tiny model) -> best.pth", ok("checkpoint"), ""))
    a = p.get("agreement")
    if a and "logits" in a:
        for k in ("uint8_no_augment", "uint8_dihedral"):
            out.append(("agreement", f"DALI GPU vs CPU {k}", "equal" if a[k]["ok"] else "DIFFER",
                        "equal"))
        for k in ("deliver_native", "deliver_resized"):
            out.append(("agreement", f"{k} max |GPU - CPU|", f"{a[k]['max_abs_diff']:.2e}",
                        f"<= {a[k]['tolerance']:.0e}"))
        lg = a["logits"]
        out.append(("agreement", "logits fp32 max |GPU - CPU|", f"{lg['fp32_max_abs_diff']:.2e}",
                    f"<= {lg['fp32_tolerance']:.1e}"))
        out.append(("agreement", f"logits {lg['amp']} GPU vs fp32 CPU",
                    f"{lg['amp_max_abs_diff']:.2e} (argmax {lg['argmax_agree']:.2f})",
                    f"<= {lg['amp_tolerance']:.1e}"))
    elif a:
        out.append(("agreement", "", "FAILED", a.get("error", "")))
    ld = p.get("loader", {})
    for k in ("dali-gpu", "dali-cpu", "torch", "raw-read"):
        if k in ld:
            goal = ">= 1600 (never limits training)" if k == "dali-gpu" else ""
            out.append(("loader", f"{k} samples/s", f"{ld[k]['per_s']:.0f}", goal))
    t = p.get("train", {})
    if "ratio" in t:
        what = f"{t['model']} {t['image_size']} px b{t['batch']} {t['amp']}"
        out.append(("train", f"{what} synthetic img/s", f"{t['synthetic_img_s']:.1f}", ""))
        out.append(("train", f"{what} loader-fed img/s", f"{t['loader_fed_img_s']:.1f}", ""))
        out.append(("train", "ratio loader-fed / synthetic", f"{t['ratio']:.2f}", ">= 0.95"))
    f = p.get("fp16_scaler", {})
    if "losses_finite" in f:
        out.append(("fp16", "GradScaler: finite losses / state resumed",
                    f"{f['losses_finite']} / {f['scaler_state_resumed']}", "True / True"))
    pr = p.get("predict", {})
    if "wells_per_s" in pr:
        out.append(("predict", f"{pr['model']} {pr['image_size']} px TTA 8 wells/s",
                    f"{pr['wells_per_s']:.1f}", ""))
    dd = p.get("ddp_nccl", {})
    if "world_size" in dd:
        out.append(("torchrun", f"{dd['backend']} x{dd['world_size']} max weight diff",
                    f"{dd['max_weight_diff_across_ranks']:.1e}", "0"))
    for name, v in p.items():
        if not v.get("ok") and "error" in v:
            out.append((name, "error", v["error"][:60], ""))
    return out


def print_table(results: dict) -> None:
    print(f"\ngpu-check on {results['gpu'] or 'no GPU'}; CPU {results['host']} "
          f"({results['cpu_capability']}), {results['cores']} cores; torch {results['torch']}; "
          f"store {results['store']['size']} px")
    lines = rows(results)
    w = [max(len(r[i]) for r in lines + [("part", "figure", "value", "goal")]) for i in range(4)]
    for r in [("part", "figure", "value", "goal")] + lines:
        print("  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip())


if __name__ == "__main__":
    from common.cli import run_command
    run_command("bench.gpu_check", main)
