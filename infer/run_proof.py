"""What predict-all holds a run and an existing prediction to (issue 20): the checkpoint
must be of the part and class count its folder says, and a prediction is kept only while
it is of the same checkpoint and lists the same wells in the same order."""
from __future__ import annotations

import os

import pandas as pd

from common.run_layout import CONFIG
from infer import InferError
from infer.predictions import IDS_FILE, ids_digest, read_ids, read_meta
from shards.layout import N_CONTROLS, N_SIRNAS, N_TREATMENTS


def expected_of(run) -> dict:
    """What the checkpoint of `run` must be (train.load_for_inference's `expect`): Part I
    (31 classes) without a fold level, else Part II/III of 1108 or 1139 classes; and the
    part of the run's own config.yml when it has one (a checkpoint copied in from elsewhere)."""
    if run.fold is None:
        expect = {"part": ("control",), "num_classes": (N_CONTROLS,)}
    else:
        expect = {"part": ("finetune", "pseudo"), "num_classes": (N_TREATMENTS, N_SIRNAS)}
    config_yml = os.path.join(run.run_dir, CONFIG)
    if os.path.isfile(config_yml):
        import yaml
        try:
            with open(config_yml) as f:
                part = (yaml.safe_load(f) or {}).get("part")
        except (OSError, yaml.YAMLError, AttributeError) as e:
            raise InferError(f"{config_yml}: cannot be read ({e})") from None
        if part in expect["part"]:
            expect["part"] = (part,)
    return expect


def stale_reason(out: str, split: str, digest: str, wells: pd.DataFrame | None) -> str | None:
    """Why the prediction in `out` is not of this checkpoint and these wells (None: it is)."""
    meta = read_meta(out, split) or {}
    if meta.get("checkpoint_digest") != digest:
        return (f"its checkpoint changed since (tensors {str(meta.get('checkpoint_digest'))[:12]}"
                f" then, {digest[:12]} now)")
    ids_path = os.path.join(out, IDS_FILE.format(split=split))
    ids = read_ids(ids_path) if os.path.isfile(ids_path) else []
    if meta.get("ids_sha256") != ids_digest(ids):
        return f"{ids_path} is not the one written with it"
    if wells is not None and ids != wells["id_code"].tolist():
        return f"{ids_path} does not list this store's test wells in this order"
    return None
