"""Part 7 of `make gpu-check`: torchrun with NCCL, one process per GPU, identical weights.

`ddp` launches torchrun on `python -m bench.gpu_check --ddp-worker=cuda`; each process
runs `run_ddp_worker`. Without a GPU (the tests' rehearsal) the same runs on the CPU
with gloo.
"""
from __future__ import annotations

import os
import subprocess
import sys

import torch

from bench.full_store import REPO
from bench.gpu_parts import CHANNELS, NUM_CLASSES, Ctx, train_step

def ddp(ctx: Ctx, nproc: int | None = None) -> dict:
    """One process per GPU (2 where there are 2 or more) under torchrun, NCCL, a few
    DDP steps on rank-dependent data; every rank's weights must be identical after.
    Without a GPU (the tests' rehearsal) `nproc` processes on the CPU with gloo."""
    import json
    device = "cuda" if ctx.gpu else "cpu"
    nproc = nproc or min(2, torch.cuda.device_count())
    out = os.path.join(ctx.work, "ddp.json")
    if os.path.exists(out):
        os.remove(out)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "bench.gpu_check", f"--ddp-worker={device}",
           "--work-dir", ctx.work]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    if done.returncode:
        raise RuntimeError(f"torchrun exited {done.returncode}: "
                           + " | ".join(done.stderr.strip().splitlines()[-5:]))
    with open(out) as f:
        result = json.load(f)
    result["ok"] = (result["backend"] == ("nccl" if ctx.gpu else "gloo")
                    and result["world_size"] == nproc and result["losses_finite"]
                    and result["max_weight_diff_across_ranks"] == 0.0)
    return result


def run_ddp_worker(work: str, device: str = "cuda", steps: int = 5) -> None:
    """Run by each torchrun process: DDP steps, then compare every rank's weights."""
    import json

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from common.distributed import init_distributed
    from common.precision import amp_dtype
    from shards.atomic import write_bytes
    from train.factory import create_model
    d, device = init_distributed(device)
    if not dist.is_initialized():       # one GPU: still join a (1-process) NCCL group
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0,
                                world_size=1, init_method="env://")
    torch.manual_seed(0)                # the same initial weights on every rank
    gpu = device.type == "cuda"
    model = create_model("cell_timm", model_name="resnet18" if gpu else "test_resnet",
                         num_classes=NUM_CLASSES, n_channels=len(CHANNELS)).to(device)
    model = DistributedDataParallel(model, device_ids=[device.index] if gpu else None)
    step = train_step(model, device, amp_dtype("auto", device))
    g = torch.Generator().manual_seed(1000 + d.rank)   # each rank its own data
    side = 128 if gpu else 32
    for _ in range(steps):
        x = torch.randn(16, len(CHANNELS), side, side, generator=g)
        step(x, torch.randint(0, NUM_CLASSES, (16,), generator=g))
    flat = torch.cat([p.detach().float().flatten() for p in model.module.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    diff = max(float((t - gathered[0]).abs().max()) for t in gathered)
    if d.rank == 0:
        write_bytes(os.path.join(work, "ddp.json"), json.dumps(
            {"world_size": dist.get_world_size(), "backend": dist.get_backend(), "steps": steps,
             "max_weight_diff_across_ranks": diff,
             "losses_finite": all(bool(torch.isfinite(x)) for x in step.losses)}))
    dist.destroy_process_group()
