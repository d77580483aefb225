"""Checkpoints: written atomically, holding what an exact resume needs.

`last.pth` (every epoch) holds the model, optimizer, scheduler and grad-scaler
states, the position (stage, epoch, optimizer step), the best metric so far,
the metric history and the RNG states of python, numpy and torch (CPU and
CUDA).  The loader's shuffling and augmentation are seeded from
(seed, epoch), so the epoch number restores them.  `best.pth` holds the model,
the resolved config and the metrics of its epoch — what inference needs.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch

FORMAT = "cellshard-train"
FORMAT_VERSION = 1


def save_atomic(obj, path: str) -> None:
    """torch.save to a temporary name, fsync, rename: a kill never leaves half a file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: str, map_location="cpu") -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"checkpoint {path} cannot be read: {e}") from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise ValueError(f"{path} is not a cellshard training checkpoint "
                         f"(format {ck.get('format') if isinstance(ck, dict) else type(ck).__name__!r})")
    if ck.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} has checkpoint format version {ck['format_version']}; "
                         f"this cellshard reads up to {FORMAT_VERSION}")
    return ck


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def is_finished(run_dir: str) -> bool:
    """A run is complete when its `finished.json` marker and best.pth exist.

    The marker is written (atomically) after the final last.pth, so reading
    it is enough; no need to load a large checkpoint to skip a run."""
    ck = os.path.join(run_dir, "checkpoints")
    return os.path.isfile(os.path.join(ck, "finished.json")) and os.path.isfile(os.path.join(ck, "best.pth"))
