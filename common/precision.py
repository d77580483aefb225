"""The mixed-precision choice, made once for training and prediction alike.

`amp: auto` means bf16 autocast where the device computes bf16 natively: a
GPU with bf16 (else fp16 with a GradScaler), and a CPU only where oneDNN has
native bf16 kernels (AVX-512 bf16 or AMX). On an AVX2-only CPU bf16 is
emulated and a training step runs ~7x slower than fp32 (resnet18 at 64 px:
8 img/s bf16 against 56 img/s fp32), so `auto` is fp32 there.
"""
from __future__ import annotations

import contextlib

import torch

AMP_MODES = ("auto", "bf16", "fp16", "none")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_capability() -> str:
    """What the CPU offers torch (e.g. 'AVX2', 'AVX512'), plus whether bf16 is native:
    written beside every speed figure, since hosts of one kind differ."""
    cap = torch.backends.cpu.get_cpu_capability()
    return f"{cap}{' +bf16' if cpu_has_native_bf16() else ' (no native bf16)'}"


def resolve_amp(setting: str, device: torch.device) -> str:
    """'auto' -> 'bf16', 'fp16' or 'none' for `device`; other settings pass through."""
    if setting not in AMP_MODES:
        raise ValueError(f"amp {setting!r} unknown; valid: {list(AMP_MODES)}")
    if setting != "auto":
        return setting
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "none"
    return "none"


def amp_dtype(setting: str, device: torch.device):
    """The autocast dtype of `setting` on `device` (None = fp32)."""
    return _DTYPES[resolve_amp(setting, device)]


def autocast(device: torch.device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
