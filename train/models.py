"""Model factories in the style of timm: one function per family, `timm.create_model` underneath.

The reference builds `cell_senet` (se_resnext50_32x4d / se_resnext101_32x4d)
and `cell_densenet` (densenet121) from ImageNet weights and widens the first
convolution to `n_channels`: the three RGB filters are copied and repeated
into the extra input channels (channel i gets RGB filter i mod 3), unscaled as
in the reference.  `pretrained`: "imagenet" (timm's own weights, from the hub
or timm's cache), a path to a local RGB weights file (loaded by timm through
`pretrained_cfg_overlay=dict(file=...)`), or "none"/None for random init.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import timm

from train.config_schema import ConfigError

# Reference (pretrainedmodels) names -> timm names: timm's legacy SENet is the exact
# port (same module names: layer0, last_linear), so the reference's weight files load.
ALIASES = {
    "se_resnext50_32x4d": "legacy_seresnext50_32x4d",
    "se_resnext101_32x4d": "legacy_seresnext101_32x4d",
}
WEIGHTS_HELP = ("make timm's download reachable (or pre-fill its cache: HF_HOME / TORCH_HOME), "
                "or set model_params.pretrained to a local RGB weights file, "
                "or set model_params.pretrained: none (random init)")


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


FIRST_CONVS = ("copy_rgb", "new")


def cell_timm(model_name, num_classes=1108, n_channels=6, pretrained=None,
              drop_rate=0.0, first_conv="copy_rgb") -> nn.Module:
    """Any timm classifier with its first conv taking `n_channels`.

    Built as the RGB ImageNet model first (3 inputs, its own head) so that timm
    loads RGB weights strictly, then given its new first conv, then a fresh
    `num_classes` head.  `first_conv`: `copy_rgb` (the reference: RGB filters
    copied into the extra channels) or `new` (the 1st place: a freshly initialized
    conv of the same shape, model.py:74).  `drop_rate`: timm's dropout before the
    classifier (train mode only).
    """
    name = timm_name(model_name)
    if not timm.is_model(name):
        raise ConfigError(f"unknown timm model {model_name!r}"
                         + (f" (alias of {name!r})" if name != model_name else "")
                         + "; see timm.list_models()")
    if first_conv not in FIRST_CONVS:
        raise ConfigError(f"model_params.first_conv {first_conv!r}: one of {list(FIRST_CONVS)}")
    model = _create_rgb(name, pretrained, drop_rate)
    if first_conv == "new":
        new_first_conv(model, n_channels)
    else:
        widen_first_conv(model, n_channels)
    model.reset_classifier(num_classes)
    return model


def _create_rgb(name: str, pretrained, drop_rate: float) -> nn.Module:
    if pretrained in (None, "none", False):
        return timm.create_model(name, pretrained=False, in_chans=3, drop_rate=drop_rate)
    if pretrained == "imagenet":
        cfg = timm.models.get_pretrained_cfg(name)
        if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
            raise ConfigError(f"model_params.pretrained imagenet: timm knows no ImageNet weights "
                              f"for {name}; {WEIGHTS_HELP}")
        try:
            return timm.create_model(name, pretrained=True, in_chans=3, drop_rate=drop_rate)
        except OSError as e:   # no network and nothing cached (URLError, hub errors are OSErrors)
            raise ConfigError(f"model_params.pretrained imagenet: the ImageNet weights of {name} "
                              f"cannot be had ({type(e).__name__}: {e}); {WEIGHTS_HELP}") from None
    try:
        return timm.create_model(name, pretrained=True, in_chans=3, drop_rate=drop_rate,
                                 pretrained_cfg_overlay=dict(file=str(pretrained)))
    except FileNotFoundError:
        raise ConfigError(f"model_params.pretrained: weights file {pretrained} does not exist; "
                          f"{WEIGHTS_HELP}") from None
    except (RuntimeError, ValueError, KeyError) as e:  # a foreign or damaged state dict
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"model_params.pretrained: {pretrained} does not fit {name} "
                          f"(an RGB {name} state dict is expected): {first}") from None


FACTORIES = {"cell_senet": cell_senet, "cell_densenet": cell_densenet, "cell_timm": cell_timm}


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


def new_first_conv(model: nn.Module, n_channels: int) -> nn.Module:
    """Replace the first conv by a freshly initialized one with `n_channels` inputs."""
    name = first_conv_name(model)
    old = _get_module(model, name)
    _set_module(model, name, nn.Conv2d(
        n_channels, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation,
        old.groups, old.bias is not None, old.padding_mode, device=old.weight.device,
        dtype=old.weight.dtype))
    return model


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
