"""Progressive pseudo labels wired into the epoch loop (stages.data_params.progressive_pseudo;
the last stage only): train.techniques.pseudo_labels' selection, run by the trainer.

After each epoch e of the last stage with e + 1 >= start_epoch, the model predicts the
test treatment wells not yet labelled (both sites, no augmentation, logits averaged per
well: the ranking is that of the 1st place's sum), and `select_labels` adds labels up
to the quota of epoch e + 1 (main.py:294-405 of the 1st place runs this at the start of
that epoch, with the same model).  The plate -> group table is read from
`plate_groups` or inferred once, at the first labelling, from that model's predictions
of every test well, and kept.  Labels and table go into last.pth: a resumed run goes on
with them.  Every rank computes the same labels from the same all-reduced predictions.

With `grow_epoch` the next epoch trains on the base selection plus the labelled wells
(its length grows, as the 1st place's); without, it keeps the base selection's number of
batches, drawn from the grown selection (a one-cycle schedule keeps its length).  In
Part III the wells the pseudo CSV already labels are left to it.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from common.well_logits import WellMeans, well_of_row
from shards.plate_groups import derive_groups, infer_plate_groups
from train.techniques.pseudo_labels import PseudoSchedule, read_plate_groups, select_labels

CHECKPOINT_KEY = "progressive_labels"
TABLE_KEY = "progressive_plate_groups"


class ProgressiveRun:
    def __init__(self, cfg, sites: pd.DataFrame, base: pd.DataFrame):
        dp = cfg.stages.data_params.to_dict()
        self.schedule = PseudoSchedule.from_params(dp["progressive_pseudo"])
        self.stage = cfg.stage_names[-1]
        self.stage_epochs = cfg.stages[self.stage].state_params.num_epochs
        self.base = base
        self.labels = pd.DataFrame({"id_code": pd.Series(dtype=str),
                                    "experiment": pd.Series(dtype=str),
                                    "plate": pd.Series(dtype="int64"),
                                    "label": pd.Series(dtype="int64")})
        self.group_of_plate: dict | None = None
        if self.schedule is None:
            return
        wells = sites.drop_duplicates("id_code")
        treat = wells[wells["well_type"] == "treatment"]
        self.groups = derive_groups(treat[treat["split"] == "train"],
                                    f"{dp['shards']} (its train treatment wells)")
        test = treat[(treat["split"] == "test") & ~treat["id_code"].isin(base["id_code"])]
        self.test = test[["id_code", "experiment", "plate"]].reset_index(drop=True)
        self.test["plate"] = self.test["plate"].astype("int64")
        self.test["label"] = np.int64(-1)    # what the run predicts
        if self.schedule.plate_groups:
            self.group_of_plate = read_plate_groups(self.schedule.plate_groups, self.groups)

    @property
    def active(self) -> bool:
        return self.schedule is not None and len(self.test) > 0

    @property
    def grows(self) -> bool:
        return self.active and self.schedule.grow_epoch

    def labels_after(self, stage_name: str, stage_epoch: int) -> bool:
        """Whether to label after `stage_epoch` (0-based) for the epoch that follows."""
        if not self.active or stage_name != self.stage or stage_epoch + 1 >= self.stage_epochs:
            return False    # (after the stage's last epoch no epoch would train on them)
        return stage_epoch + 1 >= self.schedule.start_epoch

    def unlabelled(self) -> pd.DataFrame:
        return self.test[~self.test["id_code"].isin(self.labels["id_code"])].reset_index(drop=True)

    def selection(self) -> pd.DataFrame:
        if not len(self.labels):
            return self.base
        return pd.concat([self.base, self.labels[["id_code", "experiment", "label"]]],
                         ignore_index=True)

    def add_labels(self, model, step, make_eval_loader, stage_epoch: int, device, dtype,
                   channels_last, d) -> int:
        """Label up to the quota of the epoch after `stage_epoch`; the number added.
        `make_eval_loader(wells)` builds an evaluation loader over wells."""
        if self.group_of_plate is None:     # the table, once, from every test well
            logits = predict_logits(model, step, make_eval_loader(self.test), self.test,
                                    device, dtype, channels_last, d)
            probs = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
            table = infer_plate_groups(probs, self.test, self.groups)
            self.group_of_plate = {(e, int(p)): int(g) for e, p, g in
                                   zip(table["experiment"], table["plate"], table["group"])}
            done = set(self.labels["id_code"])
            keep = ~self.test["id_code"].isin(done).to_numpy()
            todo, logits = self.test[keep].reset_index(drop=True), logits[keep]
        else:
            todo = self.unlabelled()
            logits = predict_logits(model, step, make_eval_loader(todo), todo, device, dtype,
                                    channels_last, d)
        quota = self.schedule.quota(stage_epoch + 1, self.stage_epochs, len(self.test))
        new = select_labels(logits, todo, self.group_of_plate, self.groups,
                            self.labels, quota - len(self.labels))
        self.labels = pd.concat([self.labels, pd.DataFrame({
            "id_code": new["id_code"], "experiment": new["experiment"],
            "plate": new["plate"].astype("int64"), "label": new["sirna"].astype("int64")})],
            ignore_index=True)
        return len(new)

    def state(self) -> dict:
        table = None if self.group_of_plate is None else [
            [e, p, g] for (e, p), g in sorted(self.group_of_plate.items())]
        return {CHECKPOINT_KEY: self.labels.to_dict("list"), TABLE_KEY: table}

    def restore(self, checkpoint: dict) -> None:
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved and len(saved.get("id_code", ())):
            self.labels = pd.DataFrame(saved).astype({"label": "int64", "plate": "int64"})
        table = checkpoint.get(TABLE_KEY)
        if table:
            self.group_of_plate = {(e, int(p)): int(g) for e, p, g in table}


@torch.no_grad()
def predict_logits(model, step, loader, wells, device, dtype, channels_last, d) -> np.ndarray:
    """(n_wells, n_sirna columns) per-well mean logits of `wells`."""
    model.eval()
    means = WellMeans(well_of_row(loader.sites, wells), len(wells))
    for images, _labels, rows in loader:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        means.add(np.asarray(rows), step.predict(model, images, rows, device, dtype).cpu().numpy())
    if d.enabled:
        means.all_reduce(device)
    return means.means()
