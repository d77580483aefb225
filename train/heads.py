"""The plus recipe's model: a timm backbone, the cell type beside its pooled features, a
softmax classifier, and an optional ArcFace branch for the auxiliary loss.

`cell_plus(...)` is a factory in the style of train.models (same `model_name`,
`n_channels`, `pretrained`, `drop_rate` arguments):

    images -> backbone (timm, num_classes=0: pooled features, first conv widened)
           -> [features, one-hot of the 4 cell types] -> dropout -> Linear -> logits
    features -> ArcFaceBranch (Linear + BatchNorm1d embedding, cosine to the classes)

Only the softmax logits predict; the ArcFace cosine feeds the auxiliary loss
in training.  The head's parameters sit under `head.` (classifier and ArcFace),
which `pretrained_cfg["classifier"]` names, so train.models.head_parameter_names
(stage0's frozen backbone) and the first-conv helpers work unchanged.

With the cell type as an input, the model needs each sample's cell type:
`cell_type_index(experiments)` and `cell_types_of_rows(sites)` make it from the
experiment names, as the loader's rows point into its sites table.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.errors import BadInput
from common.well_logits import per_row
from shards.layout import CELL_TYPES, cell_type_of
from train.arcface import ArcFaceBranch
from train.config_schema import ConfigError
from train.models import cell_timm, first_conv_name

N_CELL_TYPES = len(CELL_TYPES)
ARCFACE_DEFAULTS = {"s": 30.0, "m": 0.5, "dim": 512, "weight": 0.2}


class PlusHead(nn.Module):
    def __init__(self, n_features: int, num_classes: int, drop_rate: float,
                 cell_type_input: bool, arcface: Mapping | None):
        super().__init__()
        self.n_cell_types = N_CELL_TYPES if cell_type_input else 0
        self.dropout = nn.Dropout(drop_rate)
        self.classifier = nn.Linear(n_features + self.n_cell_types, num_classes)
        self.arcface = None if arcface is None else ArcFaceBranch(
            n_features, num_classes, dim=int(arcface["dim"]), s=float(arcface["s"]),
            m=float(arcface["m"]))


class PlusNet(nn.Module):
    """forward(images, cell_type_idx=None, with_aux=False) -> logits, or (logits, cosine)
    with `with_aux` (cosine: the ArcFace branch's (B, num_classes), None without one).
    The auxiliary output goes through forward so that DDP sees every parameter used."""

    def __init__(self, backbone: nn.Module, num_classes: int, drop_rate: float = 0.0,
                 cell_type_input: bool = True, arcface: Mapping | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = PlusHead(backbone.num_features, num_classes, drop_rate, cell_type_input,
                             arcface)
        self.num_classes = num_classes
        self.arcface_weight = float(arcface["weight"]) if arcface is not None else 0.0
        cfg = dict(getattr(backbone, "pretrained_cfg", {}) or {})
        cfg.update(first_conv="backbone." + first_conv_name(backbone), classifier="head")
        self.pretrained_cfg = cfg

    @property
    def takes_cell_type(self) -> bool:
        return self.head.n_cell_types > 0

    def forward(self, images: torch.Tensor, cell_type_idx: torch.Tensor | None = None,
                with_aux: bool = False):
        feats = self.backbone(images)
        x = feats
        if self.takes_cell_type:
            if cell_type_idx is None:
                raise ValueError("this model takes each sample's cell type: "
                                 "model(images, cell_type_idx)")
            onehot = F.one_hot(cell_type_idx.to(feats.device).long(), N_CELL_TYPES)
            x = torch.cat([feats, onehot.to(feats.dtype)], dim=1)
        logits = self.head.classifier(self.head.dropout(x))
        if not with_aux:
            return logits
        cosine = None if self.head.arcface is None else self.head.arcface(feats)[1]
        return logits, cosine

    def aux_loss(self, cosine: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor:
        """The weighted ArcFace loss (0 without the branch); targets int (B,) or soft (B, C)."""
        if cosine is None:
            return torch.zeros((), device=targets.device)
        return self.arcface_weight * self.head.arcface.loss(cosine, targets)

    @staticmethod
    def cell_types_of_rows(sites) -> np.ndarray:
        """For prediction, which may not import train's modules: see cell_types_of_rows."""
        return cell_types_of_rows(sites)

    def plain_state_to_own(self, state: Mapping[str, torch.Tensor]) -> dict:
        """A plain train.models state dict (e.g. the control model's) as this model's keys:
        its backbone's tensors under `backbone.`, its classifier left out."""
        own = self.backbone.state_dict()
        return {"backbone." + k: v for k, v in state.items() if k in own}


def arcface_params(arcface) -> dict | None:
    """model_params.arcface: null/false = off, true = the defaults, or a mapping of them."""
    if arcface is None or arcface is False:
        return None
    if arcface is True:
        return dict(ARCFACE_DEFAULTS)
    if not isinstance(arcface, Mapping):
        raise ConfigError(f"model_params.arcface {arcface!r}: null/false (off), true or a "
                          f"mapping of {sorted(ARCFACE_DEFAULTS)}")
    unknown = set(arcface) - set(ARCFACE_DEFAULTS)
    if unknown:
        raise ConfigError(f"model_params.arcface: unknown key(s) {sorted(unknown)}; valid: "
                          f"{sorted(ARCFACE_DEFAULTS)}")
    out = dict(ARCFACE_DEFAULTS, **arcface)
    for k, v in out.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ConfigError(f"model_params.arcface.{k} {v!r}: need a number >= 0")
    return out


def cell_plus(model_name="se_resnext50_32x4d", num_classes=1139, n_channels=6,
              pretrained=None, drop_rate=0.0, cell_type_input=True, arcface=None) -> PlusNet:
    """The plus head on any timm backbone (ImageNet or local weights as train.models)."""
    backbone = cell_timm(model_name, num_classes=0, n_channels=n_channels,
                         pretrained=pretrained, drop_rate=0.0)
    return PlusNet(backbone, num_classes, float(drop_rate), bool(cell_type_input),
                   arcface_params(arcface))


def cell_type_index(experiments) -> np.ndarray:
    """Index into layout.CELL_TYPES of each experiment name (`HUVEC-07` -> 1)."""
    names, inverse = np.unique(np.asarray(experiments, dtype=str), return_inverse=True)
    known = {c: i for i, c in enumerate(CELL_TYPES)}
    idx = np.empty(len(names), np.int64)
    for i, exp in enumerate(names):
        try:
            ct = cell_type_of(exp)
        except ValueError as e:
            raise BadInput(str(e)) from None
        if ct not in known:
            raise BadInput(f"experiment {exp!r}: cell type {ct} is none of {list(CELL_TYPES)}; "
                           "a model with the cell type as input knows only these")
        idx[i] = known[ct]
    return idx[inverse.reshape(-1)]


def cell_types_of_rows(sites) -> np.ndarray:
    """Per row number the loader yields (the sites table's `row` column, else its position),
    the cell-type index of that site: `torch.as_tensor(lut[rows])` per batch."""
    return per_row(sites, cell_type_index(sites["experiment"].to_numpy()))
