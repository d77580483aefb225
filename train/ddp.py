"""The torchrun side of training: the process group, DDP wrapping, and keeping ranks equal.

Under torchrun every rank reads its own part of the data and DDP averages the
gradients; only rank 0 writes files.  Single-process runs pass through."""
from __future__ import annotations

import gc

import torch
import torch.distributed as torch_dist
import torch.nn as nn

from common.distributed import Dist, init_distributed
from train.config_schema import ConfigError


def setup(device_setting: str) -> tuple[Dist, torch.device]:
    try:
        return init_distributed(device_setting)
    except ValueError as e:   # CUDA asked for where none is visible
        raise ConfigError(f"args.device: {e}") from None


def barrier(d: Dist) -> None:
    if d.enabled:
        torch_dist.barrier()


def wrap(model: nn.Module, d: Dist, device: torch.device) -> nn.Module:
    """DDP over `model` (after its trainable set changed: DDP registers hooks once)."""
    if not d.enabled:
        return model
    gc.collect()  # drop a previous stage's DDP hooks before wrapping again
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@torch.no_grad()
def sync_buffers(model: nn.Module, d: Dist) -> None:
    """DDP keeps parameters equal but each rank updates its own BatchNorm statistics
    in its forwards; average them so every rank (and the checkpoint) agrees."""
    if not d.enabled:
        return
    for b in model.buffers():
        if b.dtype.is_floating_point:
            torch_dist.all_reduce(b)
            b /= d.world_size
        else:
            torch_dist.broadcast(b, 0)


def all_sum(values: list[float], d: Dist, device: torch.device) -> list[float]:
    """Sum a few numbers over the ranks (one all-reduce); the values themselves when alone."""
    t = torch.tensor(values, dtype=torch.float64)
    if d.enabled:
        t = t.to(device if device.type == "cuda" else "cpu")
        torch_dist.all_reduce(t)
    return [float(x) for x in t.cpu()]


def all_gather_objects(obj, d: Dist) -> list:
    if not d.enabled:
        return [obj]
    out = [None] * d.world_size
    torch_dist.all_gather_object(out, obj)
    return out
