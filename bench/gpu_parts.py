"""The measurements and checks of `make gpu-check`, one function per part.

Each part takes the `Ctx` (store, sizes, devices) and returns a dict of its
figures; `bench.gpu_check` runs them in order, times them, and writes the table.
Every part uses the public APIs the pipeline itself uses: `shards.make_loader`
with a `LoaderSpec`, `train.factory.create_model`, `train.load_for_inference`,
`common.precision`, `infer.predict.predict_wells`, the train CLI and torchrun.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from bench.full_store import REPO

CHANNELS = (1, 2, 3, 4, 5)      # the reference's first five-channel subset
NUM_CLASSES = 1108


@dataclass
class Ctx:
    store: str                   # a packed store (prep shards)
    work: str                    # scratch: checkpoints, logs, torchrun output
    size: int                    # native side of the store's images
    batch: int                   # global batch
    steps: int                   # timed steps / batches per figure
    warmup: int
    model: str                   # timm / reference name of the throughput model
    workers: int
    gpu: bool                    # a CUDA device is visible

    @property
    def device(self) -> torch.device:
        return torch.device("cuda:0" if self.gpu else "cpu")


def spec(ctx: Ctx, **changes):
    """The training read of the recipe: 5 channels, augmentation on, native size."""
    from shards import LoaderSpec
    base = LoaderSpec(channels=CHANNELS, norm="site", sites="random", batch_size=ctx.batch,
                      augment=True, channel_dropout=0.5, shear_deg=10.0, shear_p=0.5, seed=0,
                      backend="dali", device=str(ctx.device), num_workers=ctx.workers)
    return dataclasses.replace(base, **changes)


def loader(ctx: Ctx, selection="train", **changes):
    from shards import make_loader
    return make_loader(ctx.store, selection, spec(ctx, **changes))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batches(ctx: Ctx, source, n: int):
    """`n` batches of `source` (re-iterated over epochs as needed)."""
    epoch = 0
    while True:
        if hasattr(source, "set_epoch"):
            source.set_epoch(epoch)
        for item in source:
            yield item
            n -= 1
            if n <= 0:
                return
        epoch += 1


def rate(items, warmup: int, device: torch.device, step=None) -> dict:
    """samples/s over the items after `warmup`; each item is timed from the end of the
    previous one, so a wait for the loader counts."""
    count, t0 = 0, None
    for i, (images, labels, *_rest) in enumerate(items):
        if step is not None:
            step(images, labels)
        sync(device)
        if i == warmup - 1:
            t0 = time.perf_counter()
        elif i >= warmup:
            count += len(images)
    if t0 is None or count == 0:
        raise RuntimeError(f"fewer than {warmup + 1} batches to time")
    seconds = time.perf_counter() - t0
    return {"samples": count, "seconds": seconds, "per_s": count / seconds}


# ------------------------------------------------------------------ 2. agreement

def agreement(ctx: Ctx, checkpoint: str) -> dict:
    """GPU vs CPU: DALI uint8 batches, the delivery step, a trained model's logits."""
    out = {}
    n = 3
    for name, augment in (("uint8_no_augment", False), ("uint8_dihedral", True)):
        # norm none delivers pixel / 255 exactly, so x * 255 rounds back to the uint8 batch;
        # shear (an interpolation) and dropout are off: flips and transposes must be exact.
        kw = dict(norm="none", augment=augment, channel_dropout=0.0, shear_p=0.0,
                  shuffle=True, batch_size=ctx.batch)
        gpu = batches(ctx, loader(ctx, **kw), n)
        cpu = batches(ctx, loader(ctx, device="cpu", **kw), n)
        equal, rows_equal = True, True
        for (a, _la, ra), (b, _lb, rb) in zip(gpu, cpu):
            rows_equal &= torch.equal(ra.cpu(), rb.cpu())
            equal &= torch.equal((a.cpu() * 255).round(), (b * 255).round())
        out[name] = {"batches": n, "rows_equal": bool(rows_equal), "pixels_equal": bool(equal),
                     "ok": bool(rows_equal and equal)}
    # The delivery step (channel subset, float32, (x - mean) / std) on each device, same input.
    for name, size in (("deliver_native", None), ("deliver_resized", ctx.size // 2)):
        kw = dict(norm="site", augment=False, shuffle=False, image_size=size)
        diffs = [float((a.cpu() - b).abs().max()) for (a, *_), (b, *_) in
                 zip(batches(ctx, loader(ctx, **kw), n),
                     batches(ctx, loader(ctx, device="cpu", **kw), n))]
        tol = 1e-5 if size is None else 1e-4   # resize: antialiased bilinear, 1e-4 as the tests
        out[name] = {"max_abs_diff": max(diffs), "tolerance": tol, "ok": max(diffs) <= tol}
    out["logits"] = logits_agreement(ctx, checkpoint)
    out["ok"] = all(v["ok"] for v in out.values())
    return out


def logits_agreement(ctx: Ctx, checkpoint: str) -> dict:
    """One trained checkpoint, one batch: fp32 GPU vs fp32 CPU (tight), bf16 GPU vs fp32 CPU."""
    from common.precision import amp_dtype, autocast
    from train import load_for_inference
    cpu_model, rc = load_for_inference(checkpoint, "cpu")
    gpu_model, _ = load_for_inference(checkpoint, str(ctx.device))
    images, *_ = next(iter(loader(ctx, channels=tuple(rc["channels"]), norm=rc["norm"],
                                  image_size=int(rc["image_size"]), augment=False,
                                  device="cpu", batch_size=min(ctx.batch, 32))))
    # fp32 on the GPU means fp32: TF32 convolutions (cuDNN's default on Ampere and later)
    # would alone differ from the CPU by ~1e-3 relative.
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    with torch.no_grad():
        ref = cpu_model(images).float()
        fp32 = gpu_model(images.to(ctx.device)).float().cpu()
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
        dtype = amp_dtype("auto", ctx.device)
        with autocast(ctx.device, dtype):
            low = gpu_model(images.to(ctx.device)).float().cpu()
    scale = float(ref.abs().max()) + 1e-6
    d32 = float((fp32 - ref).abs().max())
    dlow = float((low - ref).abs().max())
    # bf16 keeps 8 bits of mantissa (relative step 2^-8 = 0.4 %); errors add up over the
    # layers, so 3 % of the logits' range is "within bf16 tolerance", and argmax must agree.
    return {"checkpoint": os.path.relpath(checkpoint, ctx.work),
            "fp32_max_abs_diff": d32, "fp32_tolerance": 1e-3 * scale,
            "amp": str(dtype).replace("torch.", "") if dtype else "fp32",
            "amp_max_abs_diff": dlow, "amp_tolerance": 0.03 * scale,
            "argmax_agree": float((low.argmax(1) == ref.argmax(1)).float().mean()),
            "ok": d32 <= 1e-3 * scale and dlow <= 0.03 * scale}


# ------------------------------------------------------------------ 3. loader throughput

def raw_read(ctx: Ctx) -> dict:
    """The train shards' bytes read in order, nothing else: the ceiling (page cache warm)."""
    from shards import open_store
    store = open_store(ctx.store)
    paths = store.shard_paths("train")
    n = int((store.sites["split"] == "train").sum())
    buf = bytearray(1 << 24)
    for _ in range(2):   # the first pass warms the page cache; the second is timed
        t0 = time.perf_counter()
        for p in paths:
            with open(p, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass
        seconds = time.perf_counter() - t0
    return {"samples": n, "seconds": seconds, "per_s": n / seconds}


def loader_throughput(ctx: Ctx) -> dict:
    cases = {"dali-gpu": dict(backend="dali"), "dali-cpu": dict(backend="dali", device="cpu"),
             "torch": dict(backend="torch", device="cpu")}
    if not ctx.gpu:
        del cases["dali-gpu"]
    out = {"raw-read": raw_read(ctx)}
    for name, kw in cases.items():
        dev = torch.device(kw.get("device", str(ctx.device)))
        out[name] = rate(batches(ctx, loader(ctx, **kw), ctx.warmup + ctx.steps), ctx.warmup,
                         dev)
    out["ok"] = all(v["per_s"] > 0 for v in out.values())
    return out


# ------------------------------------------------------------------ 4./5. training steps

def make_model(ctx: Ctx):
    from train.factory import create_model
    torch.manual_seed(0)
    model = create_model("cell_timm", model_name=ctx.model, num_classes=NUM_CLASSES,
                         n_channels=len(CHANNELS))
    return model.to(ctx.device).to(memory_format=torch.channels_last).train()


def train_step(model, device, dtype, scaler=None):
    from common.precision import autocast
    from train.schedule import make_optimizer
    opt = make_optimizer(model.parameters(), "Nadam", lr=1e-4)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    losses = []

    def step(images, labels):
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        labels = labels.to(device).remainder(NUM_CLASSES)   # controls: any class does for timing
        with autocast(device, dtype):
            loss = criterion(model(images).float(), labels)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    step.losses, step.opt = losses, opt
    return step


def synthetic(ctx: Ctx, n: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(ctx.batch, len(CHANNELS), ctx.size, ctx.size, generator=g).to(ctx.device)
    y = torch.randint(0, NUM_CLASSES, (ctx.batch,), generator=g).to(ctx.device)
    for _ in range(n):
        yield x, y


def train_throughput(ctx: Ctx) -> dict:
    from common.precision import amp_dtype
    dtype = amp_dtype("auto", ctx.device)
    if ctx.gpu:
        torch.backends.cudnn.benchmark = True
    model = make_model(ctx)
    step = train_step(model, ctx.device, dtype)
    n = ctx.warmup + ctx.steps
    syn = rate(synthetic(ctx, n), ctx.warmup, ctx.device, step)
    fed = rate(batches(ctx, loader(ctx), n), ctx.warmup, ctx.device, step)
    finite = all(bool(torch.isfinite(x)) for x in step.losses)
    return {"model": ctx.model, "image_size": ctx.size, "batch": ctx.batch,
            "amp": str(dtype).replace("torch.", "") if dtype else "fp32", "channels_last": True,
            "synthetic_img_s": syn["per_s"], "loader_fed_img_s": fed["per_s"],
            "ratio": fed["per_s"] / syn["per_s"], "goal_ratio": 0.95, "losses_finite": finite,
            "ok": finite}


def fp16_scaler(ctx: Ctx, steps: int = 4) -> dict:
    """fp16 autocast with a GradScaler (apex O1's equivalent): finite losses, and the
    scaler's state saved and resumed into a fresh scaler that carries on."""
    model = make_model(ctx)
    scaler = torch.amp.GradScaler(ctx.device.type)
    step = train_step(model, ctx.device, torch.float16, scaler)
    for images, labels in synthetic(ctx, steps):
        step(images, labels)
    path = os.path.join(ctx.work, "fp16_state.pth")
    torch.save({"model": model.state_dict(), "optimizer": step.opt.state_dict(),
                "scaler": scaler.state_dict()}, path)
    saved = torch.load(path, map_location=ctx.device)
    resumed = torch.amp.GradScaler(ctx.device.type)
    resumed.load_state_dict(saved["scaler"])
    same = resumed.state_dict() == scaler.state_dict()
    step2 = train_step(model, ctx.device, torch.float16, resumed)
    step2.opt.load_state_dict(saved["optimizer"])
    for images, labels in synthetic(ctx, 2):
        step2(images, labels)
    losses = [float(x) for x in step.losses + step2.losses]
    finite = all(np.isfinite(losses))
    return {"steps": steps + 2, "losses": losses, "scale": float(resumed.get_scale()),
            "losses_finite": finite, "scaler_state_resumed": same, "ok": finite and same}


# ------------------------------------------------------------------ 6. prediction

def predict_throughput(ctx: Ctx, wells_limit: int) -> dict:
    """Wells/s of the prediction pass (both sites, 8 dihedral views, site mean) with the
    throughput model at the store's size, through infer's own predict_wells."""
    import pandas as pd

    from common.distributed import Dist
    from infer.predict import predict_wells
    from shards import open_store
    sites = open_store(ctx.store).sites
    wells = sites.drop_duplicates("id_code")[["id_code", "experiment"]].head(wells_limit)
    wells = pd.DataFrame({"id_code": wells["id_code"], "experiment": wells["experiment"],
                          "label": -1}).reset_index(drop=True)
    model = make_model(ctx).eval()
    if ctx.gpu:
        torch.backends.cudnn.benchmark = True
    source = loader(ctx, wells, sites="two", augment=False, shuffle=False, label_column="label")
    for _pass in range(2):   # the first pass builds the pipeline and tunes cuDNN
        sync(ctx.device)
        t0 = time.perf_counter()
        logits, counts = predict_wells(model, source, wells, 8, ctx.device, Dist())
        sync(ctx.device)
        seconds = time.perf_counter() - t0
    return {"model": ctx.model, "image_size": ctx.size, "tta": 8, "wells": len(wells),
            "wells_per_s": len(wells) / seconds, "sites_per_well": float(counts.mean()),
            "ok": bool(np.isfinite(logits).all() and (counts == 2).all())}


# ------------------------------------------------------------------ a trained checkpoint

def train_checkpoint(ctx: Ctx, image_size: int) -> str:
    """A short Part I run through the train CLI (the tests' tiny model and schedule) on
    the store: the checkpoint `load_for_inference` reads in the logits check."""
    from shards import open_store
    wells = open_store(ctx.store).sites.drop_duplicates("id_code")[["id_code", "experiment"]]
    # Train on the first experiment's controls only (the check needs a trained model, not a
    # good one) and validate on the rest; a one-experiment store trains and validates on it.
    experiments = sorted(wells["experiment"].unique())
    holdout = len(experiments) > 1
    valid = os.path.join(ctx.work, "valid_controls.csv")
    wells[wells["experiment"] != experiments[0] if holdout else slice(None)].to_csv(
        valid, index=False)
    logdir = os.path.join(ctx.work, "logs")
    cmd = [sys.executable, "-m", "train", "control", "--shards", ctx.store, "--logdir", logdir,
           "--channels", "[1,2,3,4,5]", "--overrides", "configs/tiny.yml",
           f"--args.device={'cuda' if ctx.gpu else 'cpu'}",
           f"--stages.data_params.valid_csv={valid}",
           f"--stages.data_params.control_holdout={holdout}",
           "--stages.data_params.sites=random",
           f"--stages.data_params.image_size={image_size}",
           f"--stages.data_params.num_workers={min(ctx.workers, 4)}",
           "--stages.stage1.state_params.num_epochs=1",
           "--stages.stage1.scheduler_params.num_steps=1",
           "--stages.stage1.scheduler_params.warmup_steps=0"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"python -m train control exited {done.returncode}: "
                           + " | ".join(done.stderr.strip().splitlines()[-3:]))
    from common.run_layout import find_run_dirs
    runs = find_run_dirs(os.path.join(logdir, "control"))
    if len(runs) != 1:
        raise RuntimeError(f"expected one control run under {logdir}, found {runs}")
    return os.path.join(runs[0].path, "checkpoints", "best.pth")
