"""Model factories in the style of timm: one function per family, `timm.create_model` underneath.

The reference builds `cell_senet` (se_resnext50_32x4d / se_resnext101_32x4d)
and `cell_densenet` (densenet121) from ImageNet weights and widens the first
convolution to `n_channels`: the three RGB filters are copied and repeated
into the extra input channels (channel i gets RGB filter i mod 3), unscaled as
in the reference.  Here weights never come from the network: `pretrained` is
a local file holding an RGB (3-channel) state dict, or None for random init.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import timm

# Reference (pretrainedmodels) names -> timm names.
ALIASES = {
    "se_resnext50_32x4d": "seresnext50_32x4d",
    "se_resnext101_32x4d": "seresnext101_32x4d",
}
_STATE_DICT_KEYS = ("model_state_dict", "state_dict", "model", "state_dict_ema")


def timm_name(model_name: str) -> str:
    return ALIASES.get(model_name, model_name)


def cell_senet(model_name="se_resnext50_32x4d", num_classes=1108, n_channels=6,
               pretrained=None, **kwargs) -> nn.Module:
    """SE-ResNeXt (reference Part I-III backbone)."""
    return cell_timm(model_name, num_classes=num_classes, n_channels=n_channels,
                     pretrained=pretrained, **kwargs)


def cell_densenet(model_name="densenet121", num_classes=1108, n_channels=6,
                  pretrained=None, **kwargs) -> nn.Module:
    """DenseNet (the reference's third model)."""
    return cell_timm(model_name, num_classes=num_classes, n_channels=n_channels,
                     pretrained=pretrained, **kwargs)


def cell_timm(model_name, num_classes=1108, n_channels=6, pretrained=None,
              drop_rate=0.0) -> nn.Module:
    """Any timm classifier with its first conv widened to `n_channels`.

    Built as the RGB model first so that an RGB weights file loads unchanged,
    then widened, then given a fresh `num_classes` head (ImageNet has 1000).
    """
    name = timm_name(model_name)
    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {model_name!r}"
                         + (f" (alias of {name!r})" if name != model_name else "")
                         + "; see timm.list_models()")
    model = timm.create_model(name, pretrained=False, in_chans=3, drop_rate=drop_rate)
    if pretrained:
        load_rgb_weights(model, pretrained)
    widen_first_conv(model, n_channels)
    model.reset_classifier(num_classes)
    return model


FACTORIES = {"cell_senet": cell_senet, "cell_densenet": cell_densenet, "cell_timm": cell_timm}


def create_model(model: str = "cell_senet", **params) -> nn.Module:
    """`model_params` of a config -> nn.Module (the reference's `model:` + its arguments)."""
    if model not in FACTORIES:
        raise ValueError(f"unknown model factory {model!r}; valid: {sorted(FACTORIES)}")
    return FACTORIES[model](**params)


# ------------------------------------------------------------------ parts of a model

def _get_module(model: nn.Module, dotted: str) -> nn.Module:
    return model.get_submodule(dotted)


def _set_module(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent, _, leaf = dotted.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def first_conv_name(model: nn.Module) -> str:
    name = model.pretrained_cfg.get("first_conv")
    if isinstance(name, (list, tuple)):
        name = name[0]
    if not name or not isinstance(_get_module(model, name), nn.Conv2d):
        for n, m in model.named_modules():  # fall back to the first Conv2d
            if isinstance(m, nn.Conv2d):
                return n
        raise ValueError(f"{type(model).__name__} has no Conv2d")
    return name


def classifier_name(model: nn.Module) -> str:
    name = model.pretrained_cfg.get("classifier")
    if isinstance(name, (list, tuple)):
        name = name[0]
    return name


def head_parameter_names(model: nn.Module) -> set[str]:
    """Names of the classifier's parameters (what stage0 trains)."""
    prefix = classifier_name(model) + "."
    return {n for n, _ in model.named_parameters() if n.startswith(prefix)}


def n_input_channels(model: nn.Module) -> int:
    return _get_module(model, first_conv_name(model)).in_channels


@torch.no_grad()
def widen_first_conv(model: nn.Module, n_channels: int) -> nn.Module:
    """Replace the first conv by one with `n_channels` inputs; input channel i
    gets the old filter of channel i mod (old inputs) — RGB copied, then repeated."""
    name = first_conv_name(model)
    old = _get_module(model, name)
    if old.in_channels == n_channels:
        return model
    new = nn.Conv2d(n_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                    old.dilation, old.groups, old.bias is not None, old.padding_mode,
                    device=old.weight.device, dtype=old.weight.dtype)
    idx = torch.arange(n_channels) % old.in_channels
    new.weight.copy_(old.weight[:, idx])
    if old.bias is not None:
        new.bias.copy_(old.bias)
    _set_module(model, name, new)
    return model


def read_state_dict(path: str) -> dict:
    """A state dict from a .pth/.pt/.bin (optionally wrapped) or .safetensors file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained weights file {path} does not exist "
                                "(weights are read from a local file; nothing is downloaded)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict):
        for k in _STATE_DICT_KEYS:
            if k in sd and isinstance(sd[k], dict):
                sd = sd[k]
                break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


def load_rgb_weights(model: nn.Module, path: str) -> None:
    """Load an RGB model's weights; the classifier is skipped when its shape differs
    (an ImageNet head is replaced anyway).  Anything else missing is an error."""
    sd = read_state_dict(path)
    own = model.state_dict()
    head = classifier_name(model) + "."
    sd = {k: v for k, v in sd.items()
          if not (k.startswith(head) and k in own and own[k].shape != v.shape)}
    conv_w = first_conv_name(model) + ".weight"
    if conv_w in sd and conv_w in own and sd[conv_w].shape[1] != own[conv_w].shape[1]:
        raise ValueError(f"{path}: first conv {conv_w} has {sd[conv_w].shape[1]} input channels; "
                         "expected an RGB (3-channel) checkpoint")
    shape = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in sd and not k.startswith(head)]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected or shape:
        raise ValueError(f"{path} does not fit {model.pretrained_cfg.get('architecture')}: "
                         f"{len(missing)} missing {missing[:3]}, {len(unexpected)} unexpected "
                         f"{unexpected[:3]}, {len(shape)} of another shape {shape[:3]}")
    model.load_state_dict(sd, strict=False)
