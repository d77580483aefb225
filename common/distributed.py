"""torchrun set-up shared by training and prediction: one process per device,
NCCL on GPU, gloo on CPU (which is how the tests run two ranks)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = "auto") -> tuple[Dist, torch.device]:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK, pick this rank's device, join the group.

    `device`: "auto"/None (CUDA if visible), "cpu", "cuda" (cuda:LOCAL_RANK) or
    "cuda:N" (honoured only in a single process). ValueError if CUDA is asked
    for and none is visible.
    """
    d = Dist(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
             int(os.environ.get("LOCAL_RANK", "0")))
    want = str(device or "auto")
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but no CUDA device is visible")
        dev = torch.device(f"cuda:{d.local_rank}" if want == "cuda" or d.enabled else want)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if d.enabled and not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return d, dev
