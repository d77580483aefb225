"""The reference's training recipe as one loop: stages of epochs of steps.

stage0 trains the head on a frozen backbone, stage1 everything, each stage
with a fresh optimizer and scheduler (train/stages.py keeps the books).
Training uses label-smoothing cross-entropy on single sites; validation reads
both sites of every valid well, averages their logits per well and reports
plain cross-entropy, top-1 and top-3 accuracy on wells.  The best checkpoint
is chosen by `state_params.main_metric` (accuracy03).
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import shards
from common.errors import BadInput
from common.precision import amp_dtype
from common.well_logits import WellMeans, well_of_row
from train import checkpoint as ckpt
from train import ddp, stages
from train.batch_step import BatchStep
from train.config import RunConfig
from train.data import make_loader, make_loaders, selections, steps_in
from train.techniques.pseudo_run import ProgressiveRun
from train.schedule import make_optimizer, make_scheduler
from train.tensorboard_log import TrainBoard
from train.weights import (build_model, freeze_backbone, init_from_control,
                           load_best_of_previous_stage)

# Test hook: SIGKILL this process right after last.pth of this (1-based) epoch
# is written, to exercise resume exactly as a real kill would.
KILL_ENV = "CELLSHARD_KILL_AFTER_EPOCH"
# A training loss above this many times ln(num_classes) — the loss of a uniform guess,
# where a healthy run starts and from which it only goes down — means the run has
# blown up (logit margins in the hundreds); as does a NaN or inf loss.
DIVERGED_LOSS_FACTOR = 100
SYNC_EVERY = 10   # batches between the host's looks at the device (progress, divergence)


class TrainingDiverged(BadInput):
    """The loss became non-finite or exploded; nothing of that epoch was saved."""


def fit(cfg: RunConfig) -> dict:
    """Train one run (one part, channel subset, fold, model) to completion, resuming if possible.

    Returns {'run_dir', 'best', 'history', 'model', 'skipped'}; `model` is the
    trained (unwrapped) model on every rank."""
    d, device = ddp.setup(cfg.args.device)
    state = stages.prior_state(cfg)
    if state is None:
        if d.is_main:
            print(f"{cfg.run_dir}: finished before (checkpoints/best.pth complete), skipping")
        return {"run_dir": cfg.run_dir, "skipped": True, "model": None, "best": None,
                "history": None}
    a, dp = cfg.args, cfg.stages.data_params
    _set_determinism(a.deterministic, device)
    store = shards.open_store(dp.shards)
    train_sel, valid_sel = selections(cfg, store.sites)

    ckpt.seed_everything(a.seed)
    model = build_model(cfg, for_init=state.resume is None)
    if state.resume is not None:
        model.load_state_dict(state.resume["model_state_dict"])
        if d.is_main:
            print(f"{cfg.run_dir}: resuming after epoch {state.epoch} ({state.resume['stage']})")
    elif cfg.part != "control" and cfg.starts_from_control:
        state.init_from = init_from_control(model, cfg)
    stages.pick_rng(state, d)
    channels_last = a.channels_last in (True, "auto")  # NHWC: cuDNN tensor cores, oneDNN
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    dtype = amp_dtype(a.amp, device)

    stages.begin(cfg, d)
    train_loader, valid_loader = make_loaders(cfg, d, device, train_sel, valid_sel)
    n_batches = steps_in(train_loader, d, device)
    accum = cfg.stages.state_params.accumulation_steps
    step = BatchStep(cfg, model, store.sites, d.rank)
    # Progressive pseudo labels (plus and first recipes): test wells join the training
    # selection; the epoch grows with them or keeps its length (train/techniques/pseudo_run.py).
    progressive = ProgressiveRun(cfg, store.sites, train_sel)
    eval_loader = lambda wells: make_loader(cfg, d, device, wells, evaluate=True)  # noqa: E731
    if state.resume is not None:
        progressive.restore(state.resume)
        if len(progressive.labels):
            train_loader = make_loader(cfg, d, device, progressive.selection())
            if progressive.grows:
                n_batches = steps_in(train_loader, d, device)
    board = TrainBoard(cfg, d, state.epoch)
    loss_limit = DIVERGED_LOSS_FACTOR * math.log(max(cfg.model_params.num_classes, 2))
    _, best_path = stages.paths(cfg)
    kill_after = int(os.environ.get(KILL_ENV, "0") or 0)
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[dtype]

    for stage in stages.remaining(cfg, state):
        params = cfg.stages[stage.name]
        inside = stages.resumes_inside(stage, state)
        if stage.index > 0 and not inside:
            load_best_of_previous_stage(model, best_path)
            state.best = None               # best.pth is chosen among this stage's epochs
        freeze_backbone(model, params.freeze_backbone)
        net = ddp.wrap(model, d, device)
        optimizer = make_optimizer(model.parameters(), **params.optimizer_params.to_dict())
        scheduler = make_scheduler(optimizer, math.ceil(n_batches / accum),
                                   num_epochs=stage.n_epochs, **params.scheduler_params.to_dict())
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        if inside:
            optimizer.load_state_dict(state.resume["optimizer_state_dict"])
            scheduler.load_state_dict(state.resume["scheduler_state_dict"])
            scaler.load_state_dict(state.resume["scaler_state_dict"])

        for stage_epoch in range(state.epoch - stage.first_epoch, stage.n_epochs):
            if state.pending_rng is not None:   # after all set-up, so the RNG streams line up
                ckpt.set_rng_state(state.pending_rng)
                state.pending_rng = None
            train_loader.set_epoch(state.epoch)
            valid_loader.set_epoch(state.epoch)
            step.set_epoch(state.epoch)
            if getattr(scheduler, "by_position", False):
                scheduler.position(float(stage_epoch))
            lr, momentum = scheduler.get_last_lr()[0], _momentum(optimizer)
            where = (f"{cfg.part} {stage.name} epoch {state.epoch + 1} "
                     f"({stage_epoch + 1}/{stage.n_epochs} of the stage)")
            model.train()       # also a frozen backbone's BatchNorm, as in the reference
            tm = train_one_epoch(net, train_loader, n_batches, optimizer, scheduler, scaler,
                                 step, accum, device, dtype, channels_last, d, where,
                                 a.progress and d.is_main, loss_limit, stage_epoch)
            ddp.sync_buffers(model, d)
            if not scheduler.per_step:
                scheduler.step()
            vm = validate(model, step, valid_loader, valid_sel, device, dtype, channels_last, d)
            if progressive.labels_after(stage.name, stage_epoch):  # from this epoch's model
                tm["pseudo_added"] = progressive.add_labels(
                    model, step, eval_loader, stage_epoch, device, dtype, channels_last, d)
                tm["pseudo_labelled"] = len(progressive.labels)
                train_loader = make_loader(cfg, d, device, progressive.selection())
                if progressive.grows:
                    n_batches = steps_in(train_loader, d, device)
            line = state.record(cfg, stage, stage_epoch, lr,
                                {**tm, "momentum": momentum, "precision": precision}, vm)
            board.epoch(line)
            rngs = ddp.all_gather_objects(ckpt.rng_state(), d)
            stages.save_epoch(cfg, state, stage, line, ddp.unwrap(model).state_dict(),
                              optimizer, scheduler, scaler, rngs, d, extra=progressive.state())
            if d.is_main:
                print(f"{cfg.run_dir} epoch {state.epoch} {stage.name}: train_loss "
                      f"{tm['train_loss']:.4f} valid_loss {vm['valid_loss']:.4f} acc01 "
                      f"{vm['valid_accuracy01']:.4f} acc03 {vm['valid_accuracy03']:.4f} "
                      f"{tm['images_per_s']:.1f} img/s" + (" *" if line["is_best"] else ""),
                      flush=True)
            ddp.barrier(d)
            if kill_after and state.epoch == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)

    board.close()
    stages.finish(cfg, state, d)
    ddp.barrier(d)
    return {"run_dir": cfg.run_dir, "skipped": False, "model": model, "best": state.best,
            "history": state.history}


def _set_determinism(deterministic: bool, device: torch.device) -> None:
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def _momentum(optimizer) -> float | None:
    g = optimizer.param_groups[0]
    return g["betas"][0] if "betas" in g else g.get("momentum")


def _to_device(images, device, channels_last):
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


# ------------------------------------------------------------------ one epoch

def train_one_epoch(net, loader, n_batches, optimizer, scheduler, scaler, step, accum,
                    device, dtype, channels_last, d, where: str, progress: bool,
                    loss_limit: float, stage_epoch: int = 0) -> dict:
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    bad_batch = torch.full((), -1, device=device, dtype=torch.long)  # first diverged batch
    bad_loss = torch.zeros((), device=device)
    seen, steps, t0 = 0, 0, time.perf_counter()
    bar = tqdm(total=n_batches, desc=where, disable=not progress, leave=False, file=sys.stderr)
    optimizer.zero_grad(set_to_none=True)
    for i, (images, labels, rows) in enumerate(loader):
        if i >= n_batches:   # every rank takes the same number of batches (steps_in)
            break
        images, labels = _to_device(images, device, channels_last), labels.to(device)
        # One optimizer step per `accum` batches (the epoch's last group may be shorter);
        # DDP all-reduces gradients only on the batch that steps.
        group = min(accum, n_batches - (i // accum) * accum)
        steps_now = i % accum + 1 == group
        with net.no_sync() if d.enabled and not steps_now else contextlib.nullcontext():
            logits, loss = step.train(net, images, labels, rows, device, dtype)
            # The group's mean gradient; Nadam is invariant to the gradient's scale, so this
            # trains as catalyst's sum did, and keeps SGD's learning rate meaning the same.
            scaler.scale(loss / group).backward()
        if steps_now:
            if getattr(scheduler, "by_position", False):   # the 1st place's epoch + i / len
                scheduler.position(stage_epoch + i / n_batches)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if scheduler.per_step:
                scheduler.step()
            steps += 1
        # Divergence is checked on every batch without waiting for the device: the first
        # bad batch is kept on the device and read at the sync points below.
        loss = loss.detach()
        first = (bad_batch < 0) & ~(torch.isfinite(loss) & (loss <= loss_limit))
        bad_batch = torch.where(first, torch.full_like(bad_batch, i), bad_batch)
        bad_loss = torch.where(first, loss, bad_loss)
        loss_sum += loss * labels.numel()
        correct += (logits.detach().argmax(1) == labels).sum()
        seen += labels.numel()
        if not d.enabled and (i % SYNC_EVERY == 0 or i + 1 == n_batches):  # .item() waits
            _raise_if_diverged([(int(bad_batch), float(bad_loss))], where, n_batches)
            bar.set_postfix(loss=f"{float(loss):.3f}", refresh=False)
        bar.update(1)
    bar.close()
    elapsed = time.perf_counter() - t0
    # Under DDP ranks are checked together, here: a rank stopping alone would hang the others.
    _raise_if_diverged(ddp.all_gather_objects((int(bad_batch), float(bad_loss)), d), where,
                       n_batches)
    loss_total, correct_total, samples = ddp.all_sum(
        [float(loss_sum), float(correct), float(seen)], d, device)
    if samples == 0:
        raise RuntimeError("the training loader yielded no batches")
    return {"train_loss": loss_total / samples, "train_accuracy01": correct_total / samples,
            "samples": int(samples), "optimizer_steps": steps,
            "images_per_s": samples / elapsed, "train_time_s": elapsed}


def _raise_if_diverged(per_rank: list[tuple[int, float]], where: str, n_batches: int) -> None:
    bad = [(b, v) for b, v in per_rank if b >= 0]
    if bad:
        b, v = min(bad)
        raise TrainingDiverged(
            f"training diverged: {where}, batch {b + 1}/{n_batches}: loss {v:.4g}; nothing of "
            "this epoch was saved; lower the learning rate (optimizer_params.lr, "
            "scheduler_params.lr_range of the stage)")


# ------------------------------------------------------------------ validation

@torch.no_grad()
def validate(model, step, loader, wells, device, dtype, channels_last, d) -> dict:
    """Both sites of each valid well through the model; logits averaged per well."""
    model.eval()
    t0 = time.perf_counter()
    means = WellMeans(well_of_row(loader.sites, wells), len(wells))
    for images, _labels, rows in loader:
        logits = step.predict(model, _to_device(images, device, channels_last), rows, device,
                              dtype)
        means.add(np.asarray(rows), logits.cpu().numpy())
    if d.enabled:
        means.all_reduce(device)
    return well_metrics(means, wells["label"].to_numpy()) | {
        "valid_time_s": time.perf_counter() - t0}


def well_metrics(means: WellMeans, well_labels: np.ndarray) -> dict:
    """Per-well loss, top-1 and top-3 from the per-well mean logits of `means`."""
    if (means.counts == 0).any():
        raise RuntimeError(f"{int((means.counts == 0).sum())} validation wells got no site "
                           "from the loader")
    logits = torch.from_numpy(means.means())
    y = torch.from_numpy(np.array(well_labels, dtype=np.int64))   # a copy: labels may be read-only
    top3 = logits.topk(min(3, logits.shape[1]), dim=1).indices
    return {"valid_loss": F.cross_entropy(logits, y).item(),
            "valid_accuracy01": (top3[:, 0] == y).float().mean().item(),
            "valid_accuracy03": (top3 == y[:, None]).any(1).float().mean().item(),
            "n_valid_wells": len(y), "n_valid_sites": int(means.counts.sum())}
