"""Checkpoints: written atomically, holding what an exact resume needs.

`last.pth` (every epoch) holds the model, optimizer, scheduler and grad-scaler
states, the position (stage, epoch, optimizer step), the best metric so far,
the metric history and the RNG states of python, numpy and torch (CPU and
CUDA).  The loader's shuffling and augmentation are seeded from
(seed, epoch), so the epoch number restores them.  `best.pth` holds the model,
the resolved config and the metrics of its epoch — what inference needs.

Every checkpoint carries `tensors_sha256`, a digest of all its tensors (name,
dtype, shape, bytes), checked on every load: zip and pickle notice a cut file
but not flipped or zeroed bytes inside a tensor.  The digest also names the
weights, so a prediction records the one of the checkpoint it came from.
A checkpoint of format version 1 (before digests) is still read, with a
warning that it cannot be checked; re-training the run gives one.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import random
import sys
import zipfile

import numpy as np
import torch

from common.errors import BadInput
from shards.atomic import write_bytes

FORMAT = "cellshard-train"
FORMAT_VERSION = 2   # 2: tensors_sha256
DIGEST_KEY = "tensors_sha256"


class CheckpointError(BadInput):
    """A checkpoint file that is missing, damaged or not one of ours; the message names it."""


def save(obj, path: str) -> None:
    """torch.save through the one atomic write, fsynced (durable): neither a kill nor a
    machine crash leaves half a checkpoint under its name.  Adds the tensors' digest."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    obj = {**obj, "format": FORMAT, "format_version": FORMAT_VERSION}
    obj[DIGEST_KEY] = tensors_digest(obj)
    # Serialized in memory first: torch's writer reports a full disk as a bare RuntimeError,
    # a plain file write as OSError(ENOSPC), which the CLIs turn into one line.
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getbuffer(), durable=True)


def load(path: str, map_location="cpu", expect: dict | None = None) -> dict:
    """The checkpoint at `path`, its digest checked; `expect` (see `check_expected`)."""
    ck = _read(path, map_location)
    stored = ck.get(DIGEST_KEY)
    if stored is None:
        print(f"warning: {path} has no digest of its tensors (written before checkpoint format "
              f"{FORMAT_VERSION}); its weights cannot be checked — re-train the run for a checked one",
              file=sys.stderr)
        ck[DIGEST_KEY] = tensors_digest(ck)   # still names the weights for a prediction
    elif tensors_digest(ck) != stored:
        raise CheckpointError(f"checkpoint {path} is damaged: its tensors do not match the digest "
                              "saved with them; restore it or re-train the run")
    if expect:
        check_expected(ck, path, expect)
    return ck


def stored_digest(path: str) -> str | None:
    """The digest saved in a checkpoint, without reading its tensors (None: format 1).
    Enough to tell whether a prediction is of this checkpoint; `load` checks the bytes."""
    return _read(path, "cpu", mmap=True).get(DIGEST_KEY)


def check_expected(ck: dict, path: str, expect: dict) -> None:
    """Refuse a checkpoint that is not what its reader expects: `expect` maps `part`
    (a name or a tuple of names), `fold`, `num_classes` (an int or a tuple) and
    `channels` to the wanted values (a copied Part I checkpoint in a finetune run)."""
    cfg = ck.get("config") or {}
    have = {"part": cfg.get("part"),
            "fold": None if cfg.get("part") == "control" else (cfg.get("args") or {}).get("fold"),
            "num_classes": (cfg.get("model_params") or {}).get("num_classes"),
            "channels": list((cfg.get("stages") or {}).get("data_params", {}).get("channels", []))}
    for key, want in expect.items():
        ok = have[key] in want if isinstance(want, tuple) else have[key] == want
        if not ok:
            shown = " or ".join(map(str, want)) if isinstance(want, tuple) else want
            raise CheckpointError(f"checkpoint {path} is of {key} {have[key]} (part "
                                  f"{have['part']}, {have['num_classes']} classes); this run "
                                  f"expects {key} {shown} — was a checkpoint copied into the "
                                  "wrong run folder?")


def tensors_digest(obj) -> str:
    """sha256 over every tensor and array in `obj` (its path, dtype, shape and bytes), in
    the order they are stored; other values are left to the reader's own checks."""
    h = hashlib.sha256()
    for where, t in _tensors(obj, ""):
        if isinstance(t, torch.Tensor):
            t = t.detach().cpu().contiguous()
            raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
            dtype = str(t.dtype)
        else:
            raw, dtype = np.ascontiguousarray(t).view(np.uint8), str(t.dtype)
        h.update(f"{where}|{dtype}|{tuple(t.shape)}|".encode())
        h.update(raw)
    return h.hexdigest()


def _tensors(obj, where: str):
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        yield where, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if k != DIGEST_KEY:
                yield from _tensors(v, f"{where}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{where}/{i}")


def _read(path: str, map_location, mmap: bool = False) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"checkpoint {path} cannot be read (truncated or not a torch "
                              f"file): {e}); restore it or re-train the run") from None
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
