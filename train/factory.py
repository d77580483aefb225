"""`model_params` of a config -> nn.Module: the reference's factories (train.models) or the
1st place's head (train.techniques.heads), and BatchNorm momentum for either."""
from __future__ import annotations

import torch.nn as nn

from train.config_schema import ConfigError
from train.models import FACTORIES
from train.techniques.heads import cell_plus

# model_params keys only cell_plus takes; off (the defaults) for the others.
PLUS_KEYS = ("cell_type_input", "neck", "arcface")


def create_model(model: str = "cell_senet", bn_momentum=None, **params) -> nn.Module:
    """The reference's `model:` + its arguments.  `bn_momentum`: set on every BatchNorm
    (the 1st place's `--bn-mom 0.05`, model.py:131-133); None keeps torch's 0.1."""
    if model == "cell_plus":
        net = cell_plus(**params)
    elif model in FACTORIES:
        on = [k for k in PLUS_KEYS if params.pop(k, None)]
        if on:
            raise ConfigError(f"model_params.{on[0]} needs model_params.model: cell_plus, "
                              f"not {model!r}")
        net = FACTORIES[model](**params)
    else:
        raise ConfigError(f"unknown model factory {model!r}; valid: "
                          f"{sorted([*FACTORIES, 'cell_plus'])}")
    if bn_momentum is not None:
        set_bn_momentum(net, float(bn_momentum))
    return net


def set_bn_momentum(model: nn.Module, momentum: float) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum
