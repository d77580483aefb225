"""Where a run's weights start and which of them train: ImageNet (Part I), the control
model (Parts II/III), the previous stage's best (each later stage), a frozen backbone."""
from __future__ import annotations

import os
import sys

import torch.nn as nn

from train import checkpoint as ckpt
from train.config import RunConfig
from train.config_schema import ConfigError
from train.factory import create_model
from train.models import classifier_name, head_parameter_names


def build_model(cfg: RunConfig, for_init: bool) -> nn.Module:
    """The run's model; only a fresh Part I, or a fresh run that does not start from the
    control model (args.pretrained_control: none), reads `model_params.pretrained` (a
    resume or Parts II/III replace the weights anyway, so nothing is downloaded for them)."""
    params = cfg.model_params.to_dict()
    if not for_init or (cfg.part != "control" and cfg.starts_from_control):
        params["pretrained"] = "none"
    return create_model(**params)


def freeze_backbone(model: nn.Module, freeze: bool) -> None:
    """Only the head's parameters train when `freeze`.  As in the reference, the
    backbone's BatchNorm stays in train mode: its running statistics still adapt."""
    head = head_parameter_names(model)
    for name, p in model.named_parameters():
        p.requires_grad = (name in head) or not freeze


def init_from_control(model: nn.Module, cfg: RunConfig) -> str:
    """Load the backbone of the control model of the same channel subset; keep the fresh head."""
    path = cfg.args.pretrained_control
    if not os.path.isfile(path):
        raise ConfigError(
            f"control checkpoint {path} not found; Part {cfg.part} starts from the control model "
            f"of the same channel subset — train it first (python -m train control --channels "
            f"\"{list(cfg.channels)}\" ...) or set args.pretrained_control")
    ck = ckpt.load(path, expect={"part": "control"})
    src = ck["config"]
    src_ch = tuple(src["stages"]["data_params"]["channels"])
    if src["model_params"]["n_channels"] != len(cfg.channels):
        raise ConfigError(f"control checkpoint {path} was trained on "
                          f"{src['model_params']['n_channels']} channels {list(src_ch)}; this run "
                          f"uses {len(cfg.channels)} channels {list(cfg.channels)}")
    if src_ch != cfg.channels:
        print(f"warning: control checkpoint {path} was trained on channels {list(src_ch)}, "
              f"this run uses {list(cfg.channels)}", file=sys.stderr)
    own = model.state_dict()
    # The fresh head's parameters and buffers (the plus head's ArcFace BatchNorm has some).
    head = head_parameter_names(model) | {k for k in own
                                          if k.startswith(classifier_name(model) + ".")}
    sd = ck["model_state_dict"]
    if hasattr(model, "plain_state_to_own"):   # the plus head: the backbone under backbone.
        sd = model.plain_state_to_own(sd)
    sd = {k: v for k, v in sd.items() if k not in head}
    missing = [k for k in own if k not in sd and k not in head]
    unexpected = [k for k in sd if k not in own]
    shape = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if missing or unexpected or shape:
        raise ConfigError(f"control checkpoint {path} ({src['model_params']['model_name']}) does "
                          f"not fit {cfg.model_params.model_name}: {len(missing)} missing "
                          f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, "
                          f"{len(shape)} of another shape {shape[:3]}")
    model.load_state_dict(sd, strict=False)
    return path


def load_best_of_previous_stage(model: nn.Module, best_path: str) -> int | None:
    """catalyst reloaded the best checkpoint of a stage before the next one began; the
    epoch it came from, or None when there is none (a stage of 0 epochs)."""
    if not os.path.isfile(best_path):
        return None
    ck = ckpt.load(best_path)
    model.load_state_dict(ck["model_state_dict"])
    return ck["epoch"]
