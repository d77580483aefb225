"""The 1st place's head on any timm backbone (`model: cell_plus`), each part a switch:

    images -> backbone (timm, num_classes=0: pooled features)
           -> [features, cell type (4)]          model_params.cell_type_input
           -> neck: BN -> Linear(d, no bias) -> ReLU -> BN -> Linear(d, no bias) -> BN
                                                  model_params.neck (null: no neck)
           = the embedding -> dropout -> Linear  -> logits (what predicts)
                           -> ArcMarginProduct   -> cosine (the auxiliary loss)
                                                  model_params.arcface (null: none)

As model.py of maciej-sypetkowski/kaggle-rcic-1st builds it (lines 103-116: the
concatenated cell type, the neck with embedding_size 1024, both heads on the neck's
embedding; lines 135-150: embed / classify / metric_classify).  The cell type is a
vector (B, 4) so that CutMix can mix it with the labels (main.py:289); an int index
(B,) is taken too and made one-hot.  BatchNorm momentum (its `--bn-mom 0.05`, set on
every BatchNorm of the model, lines 131-133) is model_params.bn_momentum, applied by
train.factory to any model.

The head's modules sit under `head.`, which `pretrained_cfg["classifier"]` names, so
stage0's frozen backbone and init from the control model treat the neck as head.
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
from train.config_schema import ConfigError
from train.models import cell_timm, first_conv_name
from train.techniques.losses import ArcMarginProduct

N_CELL_TYPES = len(CELL_TYPES)
# The 1st place's values: main.py:44 --metric-loss-coeff 0.2; model.py:197 s=30, m=0.5.
ARCFACE_DEFAULTS = {"s": 30.0, "m": 0.5, "weight": 0.2}
NECK_DEFAULTS = {"dim": 1024}          # main.py:45 --embedding-size 1024


def neck(n_in: int, dim: int) -> nn.Sequential:
    """model.py:108-115."""
    return nn.Sequential(nn.BatchNorm1d(n_in), nn.Linear(n_in, dim, bias=False),
                         nn.ReLU(inplace=True), nn.BatchNorm1d(dim),
                         nn.Linear(dim, dim, bias=False), nn.BatchNorm1d(dim))


class PlusHead(nn.Module):
    def __init__(self, n_features: int, num_classes: int, drop_rate: float,
                 cell_type_input: bool, neck_params: Mapping | None, arcface: Mapping | None):
        super().__init__()
        self.n_cell_types = N_CELL_TYPES if cell_type_input else 0
        n_in = n_features + self.n_cell_types
        self.neck = nn.Identity() if neck_params is None else neck(n_in, int(neck_params["dim"]))
        self.embedding_dim = n_in if neck_params is None else int(neck_params["dim"])
        self.dropout = nn.Dropout(drop_rate)
        self.classifier = nn.Linear(self.embedding_dim, num_classes)
        self.margin = None if arcface is None else ArcMarginProduct(self.embedding_dim,
                                                                    num_classes)


class PlusNet(nn.Module):
    """forward(images, cell=None, with_aux=False) -> logits, or (logits, cosine) with
    `with_aux` (cosine None without a margin product).  The auxiliary output goes through
    forward so that DDP sees every parameter used."""

    def __init__(self, backbone: nn.Module, num_classes: int, drop_rate: float = 0.0,
                 cell_type_input: bool = True, neck_params: Mapping | None = None,
                 arcface: Mapping | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = PlusHead(backbone.num_features, num_classes, drop_rate, cell_type_input,
                             neck_params, arcface)
        self.num_classes = num_classes
        self.arcface = dict(arcface) if arcface is not None else None
        cfg = dict(getattr(backbone, "pretrained_cfg", {}) or {})
        cfg.update(first_conv="backbone." + first_conv_name(backbone), classifier="head")
        self.pretrained_cfg = cfg

    @property
    def takes_cell_type(self) -> bool:
        return self.head.n_cell_types > 0

    def cell_vector(self, cell: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """(B, 4) float: an int index (B,) made one-hot, or a (mixed) vector as given."""
        if cell is None:
            raise ValueError("this model takes each sample's cell type: model(images, cell)")
        cell = cell.to(like.device)
        if cell.dim() == 1:
            cell = F.one_hot(cell.long(), N_CELL_TYPES)
        return cell.to(like.dtype)

    def embed(self, images: torch.Tensor, cell: torch.Tensor | None = None) -> torch.Tensor:
        """The embedding both heads read (the neck's output; without a neck the pooled
        features, with the cell type when the model takes it)."""
        x = self.backbone(images)
        if self.takes_cell_type:
            x = torch.cat([x, self.cell_vector(cell, x)], dim=1)
        return self.head.neck(x)

    def forward(self, images: torch.Tensor, cell: torch.Tensor | None = None,
                with_aux: bool = False):
        emb = self.embed(images, cell)
        logits = self.head.classifier(self.head.dropout(emb))
        if not with_aux:
            return logits
        return logits, None if self.head.margin is None else self.head.margin(emb)

    @staticmethod
    def cell_types_of_rows(sites) -> np.ndarray:
        """For prediction, which may not import train's modules: see cell_types_of_rows."""
        return cell_types_of_rows(sites)

    def plain_state_to_own(self, state: Mapping[str, torch.Tensor]) -> dict:
        """A plain train.models state dict (e.g. the control model's) as this model's keys:
        its backbone's tensors under `backbone.`, its classifier left out."""
        own = self.backbone.state_dict()
        return {"backbone." + k: v for k, v in state.items() if k in own}


def _params(value, defaults: dict, key: str) -> dict | None:
    """null/false = off, true = the defaults, or a mapping of (some of) them."""
    if value is None or value is False:
        return None
    if value is True:
        return dict(defaults)
    if not isinstance(value, Mapping):
        raise ConfigError(f"model_params.{key} {value!r}: null/false (off), true or a "
                          f"mapping of {sorted(defaults)}")
    unknown = set(value) - set(defaults)
    if unknown:
        raise ConfigError(f"model_params.{key}: unknown key(s) {sorted(unknown)}; valid: "
                          f"{sorted(defaults)}")
    out = dict(defaults, **value)
    for k, v in out.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ConfigError(f"model_params.{key}.{k} {v!r}: need a number >= 0")
    return out


def arcface_params(arcface) -> dict | None:
    out = _params(arcface, ARCFACE_DEFAULTS, "arcface")
    if out is not None and not (out["s"] > 0 and 0 <= out["m"] < np.pi / 2
                                and 0 <= out["weight"] <= 1):
        raise ConfigError(f"model_params.arcface: s {out['s']} must be > 0, m {out['m']} in "
                          f"[0, pi/2), weight {out['weight']} in [0, 1]")
    return out


def neck_params(value) -> dict | None:
    out = _params(value, NECK_DEFAULTS, "neck")
    if out is not None and (int(out["dim"]) != out["dim"] or out["dim"] < 1):
        raise ConfigError(f"model_params.neck.dim {out['dim']!r}: need an integer >= 1")
    return out


def cell_plus(model_name="se_resnext50_32x4d", num_classes=1139, n_channels=6,
              pretrained=None, drop_rate=0.0, cell_type_input=True, neck=None, arcface=None,
              first_conv="copy_rgb") -> PlusNet:
    """The 1st place's head on any timm backbone (ImageNet or local weights as
    train.models)."""
    backbone = cell_timm(model_name, num_classes=0, n_channels=n_channels,
                         pretrained=pretrained, drop_rate=0.0, first_conv=first_conv)
    return PlusNet(backbone, num_classes, float(drop_rate), bool(cell_type_input),
                   neck_params(neck), arcface_params(arcface))


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
