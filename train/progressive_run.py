"""Progressive pseudo labels inside a run: train.progressive_pseudo's labels, wired into
the epoch loop (stages.data_params.progressive_pseudo; the last stage only).

At the end of each epoch e of the last stage with share(e + 1) > 0, the model predicts
the test treatment wells (both sites, no augmentation, logits averaged per well,
softmax over the siRNA columns); progressive_labels then labels that share of each
plate's wells, within the plate's siRNA group (derived from the store's labelled
train treatment wells), never one siRNA twice on a plate.  The next epoch trains on
the base selection plus these wells.  Every rank computes the same labels from the
same all-reduced predictions, so nothing is broadcast.

The epoch keeps the base selection's number of batches (drawn from the grown
selection, which the loader shuffles), so the stage's one-cycle schedule keeps its
length and the steps per epoch stay what the config says.  The labels go into
last.pth: a resumed run continues with the labels it had.  In Part III the wells
the pseudo CSV already labels are left to it.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from common.well_logits import WellMeans, well_of_row
from shards.plate_groups import derive_groups
from train.progressive_pseudo import ProgressiveSchedule, progressive_labels

CHECKPOINT_KEY = "progressive_labels"


class ProgressiveRun:
    def __init__(self, cfg, sites: pd.DataFrame, base: pd.DataFrame):
        dp = cfg.stages.data_params.to_dict()
        self.schedule = ProgressiveSchedule.from_params(dp["progressive_pseudo"])
        self.stage = cfg.stage_names[-1]
        self.stage_epochs = cfg.stages[self.stage].state_params.num_epochs
        self.base = base
        self.labels = base.iloc[:0].copy()
        if self.schedule is None:
            return
        wells = sites.drop_duplicates("id_code")
        treat = wells[wells["well_type"] == "treatment"]
        self.groups = derive_groups(treat[treat["split"] == "train"],
                                    f"{dp['shards']} (its train treatment wells)")
        test = treat[(treat["split"] == "test") & ~treat["id_code"].isin(base["id_code"])]
        self.test = test[["id_code", "experiment", "plate"]].reset_index(drop=True)
        self.test["label"] = np.int64(-1)    # what the run predicts

    @property
    def active(self) -> bool:
        return self.schedule is not None and len(self.test) > 0

    def share_after(self, stage_name: str, stage_epoch: int) -> float:
        """The share of test wells to label for the epoch after `stage_epoch` (0-based)."""
        if not self.active or stage_name != self.stage or stage_epoch + 1 >= self.stage_epochs:
            return 0.0    # (after the stage's last epoch no epoch would train on them)
        return self.schedule.share(stage_epoch + 1)

    def selection(self) -> pd.DataFrame:
        return pd.concat([self.base, self.labels], ignore_index=True) if len(self.labels) \
            else self.base

    def relabel(self, model, step, loader, device, dtype, channels_last, d, share: float) -> int:
        """Predict the test wells and label `share` of each plate's; the number labelled."""
        probs = predict_probs(model, step, loader, self.test, device, dtype, channels_last, d)
        out = progressive_labels(probs, self.test, self.groups, share,
                                 self.schedule.min_margin)
        self.labels = pd.DataFrame({"id_code": out["id_code"], "experiment": out["experiment"],
                                    "label": out["sirna"].astype("int64")})
        return len(self.labels)

    def state(self) -> dict:
        return {CHECKPOINT_KEY: self.labels.to_dict("list")}

    def restore(self, checkpoint: dict) -> None:
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved:
            self.labels = pd.DataFrame(saved).astype({"label": "int64"})


@torch.no_grad()
def predict_probs(model, step, loader, wells, device, dtype, channels_last, d) -> np.ndarray:
    """(n_wells, n_sirna columns) softmax of the per-well mean logits of `wells`."""
    model.eval()
    means = WellMeans(well_of_row(loader.sites, wells), len(wells))
    for images, _labels, rows in loader:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        means.add(np.asarray(rows), step.predict(model, images, rows, device, dtype).cpu().numpy())
    if d.enabled:
        means.all_reduce(device)
    return torch.softmax(torch.from_numpy(means.means()).double(), dim=1).numpy()
