"""The three-part trainer of the reference recipe (control, finetune, pseudo).

Public:
    load_config(part, config, ...) -> Config      one run's checked config
    fit(cfg) -> dict                              train one run (resumes, skips finished runs)
    run(part, config, channels="all", fold="all", ...)   the reference's loops over subsets x folds
    load_for_inference(checkpoint_path, device) -> (model, run_config)
    checkpoint_digest(checkpoint_path) -> str     the digest naming a checkpoint's tensors
"""
from __future__ import annotations


def load_config(*args, **kwargs):
    from train.config import load_config as _load
    return _load(*args, **kwargs)


def fit(cfg):
    from train.recipe import fit as _fit
    return _fit(cfg)


def run(part, config=None, channels=None, fold=None, **kwargs):
    from train.runs import run as _run
    return _run(part, config, channels=channels, fold=fold, **kwargs)


def load_for_inference(checkpoint_path, device="cpu", expect=None):
    """Rebuild a trained model from best.pth or last.pth, its digest checked.

    Returns (model in eval mode on `device`, run_config) where run_config has
    stage (control|finetune|pseudo), fold (None for control), channels (list of
    1-based channels), n_channels, num_classes, label_offset (add to an argmax
    to get the sirna: 1108 for control, else 0), model (factory), model_name,
    timm_name, model_params, image_size, norm, epoch, metrics (of that epoch),
    run_dir, config (the whole resolved config dict) and checkpoint_digest (of its tensors).
    `expect` ({part, fold, num_classes, channels}: a value or a tuple of values) refuses a
    checkpoint that is not what the caller's run folder says it is.
    No weights are downloaded; `model_params.pretrained` is not read.
    """
    import os
    import torch
    from train import checkpoint as ckpt
    from train.config_schema import LABEL_OFFSET_OF_PART
    from train.factory import create_model
    from train.models import timm_name

    ck = ckpt.load(checkpoint_path, expect=expect)
    cfg = ck["config"]
    params = dict(cfg["model_params"], pretrained="none")
    model = create_model(**params)
    model.load_state_dict(ck["model_state_dict"])
    model.to(torch.device(device)).eval()
    dp = cfg["stages"]["data_params"]
    part = cfg["part"]
    run_config = {
        "stage": part,
        "fold": None if part == "control" else cfg["args"]["fold"],
        "channels": list(dp["channels"]),
        "n_channels": params["n_channels"],
        "num_classes": params["num_classes"],
        "label_offset": LABEL_OFFSET_OF_PART[part],
        "model": params["model"],
        "model_name": params["model_name"],
        "timm_name": timm_name(params["model_name"]),
        "model_params": {k: v for k, v in params.items() if k != "pretrained"},
        "image_size": dp["image_size"],
        "norm": dp["norm"],
        "epoch": ck.get("epoch"),
        "metrics": ck.get("metrics") or (ck.get("history") or [None])[-1],
        "run_dir": os.path.dirname(os.path.dirname(os.path.abspath(checkpoint_path))),
        "config": cfg,
        "checkpoint_digest": ck[ckpt.DIGEST_KEY],
    }
    return model, run_config


def checkpoint_digest(checkpoint_path) -> str:
    """The digest of a checkpoint's tensors as saved in it (computed for a checkpoint older
    than digests); a prediction records it to know whether its checkpoint changed since."""
    from train import checkpoint as ckpt
    return ckpt.stored_digest(checkpoint_path) or ckpt.load(checkpoint_path)[ckpt.DIGEST_KEY]


__all__ = ["load_config", "fit", "run", "load_for_inference", "checkpoint_digest"]
