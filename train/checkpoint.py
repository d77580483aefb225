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
import pickle
import random
import zipfile

import numpy as np
import torch

from common.errors import BadInput
from shards.atomic import write_atomic

FORMAT = "cellshard-train"
FORMAT_VERSION = 1


class CheckpointError(BadInput):
    """A checkpoint file that is missing, damaged or not one of ours; the message names it."""


def save(obj, path: str) -> None:
    """torch.save through the one atomic write, fsynced (durable): neither a kill nor a
    machine crash leaves half a checkpoint under its name."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_atomic(path, lambda tmp: torch.save(obj, tmp), durable=True)


def load(path: str, map_location="cpu") -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"checkpoint {path} cannot be read (truncated or not a torch "
                              f"file): {e}") from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a cellshard training checkpoint (format "
                              f"{ck.get('format') if isinstance(ck, dict) else type(ck).__name__!r})")
    if ck.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {ck['format_version']}; "
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
