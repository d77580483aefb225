"""The reference's training recipe as one loop: stages of epochs of steps.

stage0 trains the head with the backbone frozen (its BatchNorm statistics
too), stage1 trains everything; each stage gets a fresh optimizer and
scheduler.  Training uses label-smoothing cross-entropy on single sites;
validation reads both sites of every valid well, averages their logits per
well and reports plain cross-entropy, top-1 and top-3 accuracy on wells.
The best checkpoint is chosen by `state_params.main_metric` (accuracy03).

Under torchrun every rank reads its own part of the data (rank/world_size go
to the loader) and DistributedDataParallel averages the gradients; only rank
0 writes files.
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import signal
import sys
import time

import numpy as np
import pandas as pd
import torch
import torch.distributed as torch_dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import shards
from common.distributed import Dist, init_distributed
from train import checkpoint as ckpt
from train.config import Config, dump_yaml
from train.data import selections
from train.models import classifier_name, create_model, head_parameter_names
from train.plots import plot_curves
from train.schedule import make_optimizer, make_scheduler

# Test hook: SIGKILL this process right after last.pth of this (1-based) epoch
# is written, to exercise resume exactly as a real kill would.
KILL_ENV = "CELLSHARD_KILL_AFTER_EPOCH"


def setup_distributed(cfg: Config) -> tuple[Dist, torch.device]:
    try:
        return init_distributed(cfg.args.device)
    except ValueError as e:
        raise RuntimeError(f"args.device: {e}") from None


def barrier(d: Dist) -> None:
    if d.enabled:
        torch_dist.barrier()


# ------------------------------------------------------------------ model parts

def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def set_trainable(model: nn.Module, freeze_backbone: bool) -> None:
    head = head_parameter_names(model)
    for name, p in model.named_parameters():
        p.requires_grad = (name in head) or not freeze_backbone


def train_mode(model: nn.Module, freeze_backbone: bool) -> None:
    """A frozen backbone also keeps its BatchNorm statistics and dropout fixed."""
    if freeze_backbone:
        model.eval()
        model.get_submodule(classifier_name(model)).train()
    else:
        model.train()


def build_model(cfg: Config, for_init: bool) -> nn.Module:
    """Seeded model; Part I may read ImageNet weights, Parts II/III get the control model's."""
    params = cfg.model_params.to_dict()
    if not for_init or cfg.part != "control":
        params["pretrained"] = None  # replaced by the resume or control weights anyway
    return create_model(**params)


def init_from_control(model: nn.Module, cfg: Config) -> str:
    """Load the backbone of the control model of the same channel subset; keep the fresh head."""
    path = cfg.args.pretrained_control
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"control checkpoint {path} not found; Part {cfg.part} starts from the control model "
            f"of the same channel subset — train it first (python -m train control --channels "
            f"\"{list(cfg.channels)}\" ...) or set args.pretrained_control")
    ck = ckpt.load(path)
    src = ck["config"]
    src_ch = tuple(src["stages"]["data_params"]["channels"])
    if src["model_params"]["n_channels"] != len(cfg.channels):
        raise ValueError(f"control checkpoint {path} was trained on {src['model_params']['n_channels']} "
                         f"channels {list(src_ch)}; this run uses {len(cfg.channels)} channels "
                         f"{list(cfg.channels)}")
    if src_ch != cfg.channels:
        print(f"warning: control checkpoint {path} was trained on channels {list(src_ch)}, "
              f"this run uses {list(cfg.channels)}", file=sys.stderr)
    head = head_parameter_names(model)
    sd = {k: v for k, v in ck["model_state_dict"].items() if k not in head}
    own = model.state_dict()
    missing = [k for k in own if k not in sd and k not in head]
    unexpected = [k for k in sd if k not in own]
    shape = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if missing or unexpected or shape:
        raise ValueError(f"control checkpoint {path} ({src['model_params']['model_name']}) does not "
                         f"fit {cfg.model_params.model_name}: {len(missing)} missing {missing[:3]}, "
                         f"{len(unexpected)} unexpected {unexpected[:3]}, {len(shape)} of another "
                         f"shape {shape[:3]}")
    model.load_state_dict(sd, strict=False)
    return path


# ------------------------------------------------------------------ loaders

def make_loaders(cfg: Config, d: Dist, device: torch.device, train_sel, valid_sel):
    dp = cfg.stages.data_params
    common = dict(channels=cfg.channels, norm=dp.norm, image_size=dp.image_size,
                  rank=d.rank, world_size=d.world_size, backend=dp.backend, device=str(device),
                  num_workers=dp.num_workers, label_column="label", seed=cfg.args.seed)
    train = shards.make_loader(dp.shards, train_sel, sites=dp.sites, site=dp.site,
                               batch_size=dp.batch_size, augment=dp.augment,
                               channel_dropout=dp.channel_dropout, shuffle=True,
                               drop_last=dp.drop_last, **common)
    valid = shards.make_loader(dp.shards, valid_sel, sites="two",
                               batch_size=dp.valid_batch_size or dp.batch_size, augment=False,
                               channel_dropout=0.0, shuffle=False, drop_last=False, **common)
    return train, valid


@torch.no_grad()
def sync_buffers(model: nn.Module, d: Dist) -> None:
    """DDP keeps parameters equal but each rank updates its own BatchNorm statistics
    in its last forward; average them so every rank (and the checkpoint) agrees."""
    if not d.enabled:
        return
    for b in model.buffers():
        if b.dtype.is_floating_point:
            torch_dist.all_reduce(b)
            b /= d.world_size
        else:
            torch_dist.broadcast(b, 0)


def steps_in(loader, d: Dist, device) -> int:
    """Batches every rank can take (the minimum), so no rank waits in an all-reduce forever."""
    n = len(loader)
    if d.enabled:
        t = torch.tensor([n], device=device if device.type == "cuda" else "cpu")
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MIN)
        n = int(t.item())
    return n


# ------------------------------------------------------------------ precision

def amp_dtype(cfg: Config, device: torch.device):
    amp = cfg.args.amp
    if amp == "auto":
        amp = "bf16" if device.type == "cpu" or torch.cuda.is_bf16_supported() else "fp16"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


def use_channels_last(setting) -> bool:
    """auto = on, GPU and CPU alike: cuDNN tensor cores want NHWC, and on the CPU
    oneDNN's bf16 convolutions reach full speed from the first step in NHWC (in
    NCHW the first dozens of steps ran ~4x slower here; see bench/train.py)."""
    return setting is True or setting == "auto"


def autocast(device: torch.device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ------------------------------------------------------------------ one epoch

def train_one_epoch(model, loader, n_batches, optimizer, scheduler, scaler, criterion, accum,
                    device, dtype, channels_last, d: Dist, desc: str, progress: bool) -> dict:
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen, steps = 0, 0
    t0 = time.perf_counter()
    bar = tqdm(total=n_batches, desc=desc, disable=not (progress and d.is_main),
               dynamic_ncols=True, leave=False, file=sys.stderr)
    optimizer.zero_grad(set_to_none=True)
    for i, (images, labels, _rows) in enumerate(loader):
        if i >= n_batches:
            break
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True)
        group_start = (i // accum) * accum
        group = min(accum, n_batches - group_start)
        sync = (i + 1 - group_start) == group
        no_sync = model.no_sync() if (d.enabled and not sync) else contextlib.nullcontext()
        with no_sync:
            with autocast(device, dtype):
                logits = model(images)
            loss = criterion(logits.float(), labels)
            scaler.scale(loss / group).backward()
        if sync:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if scheduler.per_step:
                scheduler.step()
            steps += 1
        loss_sum += loss.detach() * labels.numel()
        correct += (logits.detach().argmax(1) == labels).sum()
        seen += labels.numel()
        if i % 10 == 0 or i + 1 == n_batches:  # .item() waits for the GPU: not every step
            cur = float(loss.detach())
            if not math.isfinite(cur) and not scaler.is_enabled():
                raise FloatingPointError(f"{desc}: training loss is {cur} at batch {i}; lower the "
                                         "learning rate or set args.amp none")
        if bar.disable is False:
            bar.set_postfix(loss=f"{cur:.3f}", img_s=f"{seen * d.world_size / (time.perf_counter() - t0):.0f}",
                            refresh=False)
        bar.update(1)
    bar.close()
    elapsed = time.perf_counter() - t0
    totals = torch.stack([loss_sum.float(), correct.float(), torch.tensor(float(seen), device=device)])
    if d.enabled:
        totals = totals.cpu() if device.type == "cpu" else totals
        torch_dist.all_reduce(totals)
    loss_total, correct_total, seen_total = (float(x) for x in totals)
    if seen_total == 0:
        raise RuntimeError("the training loader yielded no batches")
    return {"train_loss": loss_total / seen_total, "train_accuracy01": correct_total / seen_total,
            "images_per_s": seen_total / elapsed, "train_time_s": elapsed,
            "n_train_images": int(seen_total), "optimizer_steps": steps}


@torch.no_grad()
def validate(model, loader, device, dtype, channels_last, d: Dist) -> dict:
    """Both sites of each well through the model; logits averaged per well."""
    model.eval()
    rows_l, logits_l, labels_l = [], [], []
    t0 = time.perf_counter()
    for images, labels, rows in loader:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, dtype):
            logits = model(images)
        logits_l.append(logits.float().cpu())
        labels_l.append(labels.cpu())
        rows_l.append(torch.as_tensor(rows).cpu())
    rows = torch.cat(rows_l).numpy() if rows_l else np.zeros(0, np.int64)
    logits = torch.cat(logits_l).numpy() if logits_l else np.zeros((0, 0), np.float32)
    labels = torch.cat(labels_l).numpy() if labels_l else np.zeros(0, np.int64)
    if d.enabled:
        parts = [None] * d.world_size
        torch_dist.all_gather_object(parts, (rows, logits, labels))
        parts = [p for p in parts if len(p[0])]
        rows = np.concatenate([p[0] for p in parts])
        logits = np.concatenate([p[1] for p in parts])
        labels = np.concatenate([p[2] for p in parts])
    return well_metrics(rows, logits, labels, loader.sites) | {
        "valid_time_s": time.perf_counter() - t0}


def well_metrics(rows, logits, labels, sites) -> dict:
    """Per-well loss, top-1 and top-3 from per-site logits (`rows` index `sites`)."""
    if len(rows) == 0:
        raise RuntimeError("the validation loader yielded no samples")
    rows = np.asarray(rows, dtype=np.int64)
    _, first = np.unique(rows, return_index=True)  # a padded last batch repeats samples
    rows, logits, labels = rows[first], logits[first], labels[first]
    id_of_row = sites.set_index("row")["id_code"] if "row" in sites.columns else sites["id_code"]
    wells = id_of_row.loc[rows].to_numpy()
    codes, uniq = pd.factorize(wells)
    n = len(uniq)
    sums = np.zeros((n, logits.shape[1]), np.float64)
    np.add.at(sums, codes, logits)
    counts = np.bincount(codes, minlength=n)[:, None]
    well_logits = torch.from_numpy(sums / counts).float()
    well_labels = np.full(n, -1, np.int64)
    well_labels[codes] = labels
    y = torch.from_numpy(well_labels)
    if (y < 0).any():
        raise RuntimeError("validation wells without a label")
    loss = F.cross_entropy(well_logits, y).item()
    top3 = well_logits.topk(min(3, well_logits.shape[1]), dim=1).indices
    return {"valid_loss": loss,
            "valid_accuracy01": (top3[:, 0] == y).float().mean().item(),
            "valid_accuracy03": (top3 == y[:, None]).any(1).float().mean().item(),
            "n_valid_wells": n, "n_valid_sites": int(len(rows))}


# ------------------------------------------------------------------ the run

def _main_value(metrics: dict, main_metric: str) -> float:
    return metrics["valid_loss" if main_metric == "loss" else f"valid_{main_metric}"]


def _is_better(value, best, minimize) -> bool:
    if best is None:
        return True
    return value < best if minimize else value > best


def _check_resume_compatible(saved: dict, cfg: Config, path: str) -> None:
    now = cfg.to_dict()
    for key in ("model_params",):
        a = {k: v for k, v in saved[key].items() if k != "pretrained"}
        b = {k: v for k, v in now[key].items() if k != "pretrained"}
        if a != b:
            raise ValueError(f"{path} was written by a run with {key} {a}; this run has {b}. "
                             "Use another logdir or delete the run to start over.")
    if saved["stages"]["data_params"]["channels"] != now["stages"]["data_params"]["channels"]:
        raise ValueError(f"{path} was trained on channels {saved['stages']['data_params']['channels']}; "
                         f"this run uses {now['stages']['data_params']['channels']}")
    if saved["stages"] != now["stages"]:
        print(f"warning: resuming {path} with changed stages settings", file=sys.stderr)


def _write_history(history: list[dict], run_dir: str) -> None:
    path = os.path.join(run_dir, "metrics.jsonl")
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        for h in history:
            f.write(json.dumps(h) + "\n")
    os.replace(tmp, path)


def fit(cfg: Config) -> dict:
    """Train one run (one part, channel subset, fold, model) to completion, resuming if possible.

    Returns {'run_dir', 'best', 'history', 'model', 'skipped'}; `model` is the
    trained (unwrapped) model on every rank."""
    d, device = setup_distributed(cfg)
    run_dir = cfg.run_dir
    ck_dir = os.path.join(run_dir, "checkpoints")
    last_path, best_path = os.path.join(ck_dir, "last.pth"), os.path.join(ck_dir, "best.pth")
    if ckpt.is_finished(run_dir):
        if d.is_main:
            print(f"{run_dir}: finished before (checkpoints/best.pth complete), skipping")
        return {"run_dir": run_dir, "skipped": True, "model": None, "best": None, "history": None}

    a, sp, dp = cfg.args, cfg.stages.state_params, cfg.stages.data_params
    if a.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    store = shards.open_store(dp.shards)
    train_sel, valid_sel = selections(cfg, store.sites)

    ckpt.seed_everything(a.seed)
    resume = ckpt.load(last_path) if os.path.isfile(last_path) else None
    model = build_model(cfg, for_init=resume is None)
    init_source = None
    if resume is not None:
        _check_resume_compatible(resume["config"], cfg, last_path)
        model.load_state_dict(resume["model_state_dict"])
        if d.is_main:
            print(f"{run_dir}: resuming after epoch {resume['epoch']} ({resume['stage']})")
    elif cfg.part != "control":
        init_source = init_from_control(model, cfg)
    channels_last = use_channels_last(a.channels_last)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    dtype = amp_dtype(cfg, device)

    if d.is_main:
        os.makedirs(ck_dir, exist_ok=True)
        dump_yaml(cfg, os.path.join(run_dir, "config.yml"))
    train_loader, valid_loader = make_loaders(cfg, d, device, train_sel, valid_sel)
    n_batches = steps_in(train_loader, d, device)
    if n_batches == 0:
        raise RuntimeError(f"the training loader has no batches on rank {d.rank} "
                           f"({len(train_sel)} wells, batch_size {dp.batch_size}, drop_last {dp.drop_last})")
    accum = sp.accumulation_steps
    steps_per_epoch = math.ceil(n_batches / accum)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.stages.criterion_params.smoothing
                                    if cfg.stages.criterion_params.criterion == "LabelSmoothingCrossEntropy"
                                    else 0.0)

    history = list(resume["history"]) if resume else []
    best = resume["best"] if resume else None
    global_step = resume["global_step"] if resume else 0
    epoch = resume["epoch"] if resume else 0          # epochs completed, all stages
    pending_rng = None
    if resume is not None:
        rngs = resume["rng"]
        pending_rng = rngs[d.rank] if len(rngs) == d.world_size else rngs[0]
    kill_after = int(os.environ.get(KILL_ENV, "0") or 0)
    first_epoch_of_stage = 0
    names = cfg.stage_names
    ddp_model = None

    for stage_index, name in enumerate(names):
        stage = cfg.stages[name]
        n_epochs = stage.state_params.num_epochs
        stage_start = first_epoch_of_stage
        first_epoch_of_stage += n_epochs
        if epoch >= first_epoch_of_stage or n_epochs == 0:
            continue                                   # finished before the resume
        freeze = stage.freeze_backbone
        set_trainable(model, freeze)
        if d.enabled:
            ddp_model = None
            gc.collect()  # drop the previous stage's DDP hooks before wrapping again
            ddp_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        net = ddp_model if d.enabled else model
        optimizer = make_optimizer(model.parameters(), **stage.optimizer_params.to_dict())
        scheduler = make_scheduler(optimizer, steps_per_epoch, **stage.scheduler_params.to_dict())
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        if resume is not None and resume["stage"] == name and epoch > stage_start:
            optimizer.load_state_dict(resume["optimizer_state_dict"])
            scheduler.load_state_dict(resume["scheduler_state_dict"])
            scaler.load_state_dict(resume["scaler_state_dict"])

        for stage_epoch in range(epoch - stage_start, n_epochs):
            if pending_rng is not None:
                ckpt.set_rng_state(pending_rng)  # after all setup, so the RNG streams line up
                pending_rng = None
            train_loader.set_epoch(epoch)
            if hasattr(valid_loader, "set_epoch"):
                valid_loader.set_epoch(epoch)
            lr = scheduler.get_last_lr()[0]
            train_mode(model, freeze)
            desc = f"{cfg.part} {name} {stage_epoch + 1}/{n_epochs}"
            tm = train_one_epoch(net, train_loader, n_batches, optimizer, scheduler, scaler, criterion,
                                 accum, device, dtype, channels_last, d, desc, a.progress)
            global_step += tm.pop("optimizer_steps")
            sync_buffers(model, d)
            if not scheduler.per_step:
                scheduler.step()
            vm = validate(model, valid_loader, device, dtype, channels_last, d)
            epoch += 1
            value = _main_value(vm, sp.main_metric)
            is_best = _is_better(value, None if best is None else best["value"], sp.minimize_metric)
            if is_best:
                best = {"value": value, "epoch": epoch, "metric": sp.main_metric}
            record = {"epoch": epoch, "stage": name, "stage_epoch": stage_epoch + 1, "step": global_step,
                      "lr": lr, **tm, **vm, "is_best": is_best}
            history.append(record)
            rngs = [ckpt.rng_state()]
            if d.enabled:
                rngs = [None] * d.world_size
                torch_dist.all_gather_object(rngs, ckpt.rng_state())
            if d.is_main:
                finished = epoch == first_epoch_of_stage and stage_index == len(names) - 1
                state = unwrap(model).state_dict()
                if is_best:
                    ckpt.save_atomic({"format": ckpt.FORMAT, "format_version": ckpt.FORMAT_VERSION,
                                      "model_state_dict": state, "config": cfg.to_dict(),
                                      "epoch": epoch, "stage": name, "metrics": record,
                                      "best": best, "init_from": init_source}, best_path)
                ckpt.save_atomic({
                    "format": ckpt.FORMAT, "format_version": ckpt.FORMAT_VERSION,
                    "model_state_dict": state, "optimizer_state_dict": optimizer.state_dict(),
                    "scheduler_state_dict": scheduler.state_dict(),
                    "scaler_state_dict": scaler.state_dict(), "config": cfg.to_dict(),
                    "stage": name, "stage_index": stage_index, "epoch": epoch,
                    "global_step": global_step, "best": best, "history": history, "rng": rngs,
                    "finished": finished, "init_from": init_source or (resume or {}).get("init_from"),
                }, last_path)
                _write_history(history, run_dir)
                plot_curves(history, os.path.join(run_dir, "curves.png"))
                print(f"{run_dir} epoch {epoch} {name}: train_loss {tm['train_loss']:.4f} "
                      f"valid_loss {vm['valid_loss']:.4f} acc01 {vm['valid_accuracy01']:.4f} "
                      f"acc03 {vm['valid_accuracy03']:.4f} {tm['images_per_s']:.1f} img/s"
                      + (" *" if is_best else ""), flush=True)
            barrier(d)
            if kill_after and epoch == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)

    if d.is_main:
        with open(os.path.join(ck_dir, "finished.json.tmp"), "w") as f:
            json.dump({"epochs": epoch, "best": best}, f)
        os.replace(os.path.join(ck_dir, "finished.json.tmp"), os.path.join(ck_dir, "finished.json"))
    barrier(d)
    return {"run_dir": run_dir, "skipped": False, "model": model, "best": best, "history": history}
