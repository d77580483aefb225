"""TensorBoard event files of a run, beside its metrics.jsonl: `tensorboard --logdir logs`
shows every run's curves side by side, as the reference's catalyst runs did.

One scalar per metric and epoch (loss, accuracies, learning rate, momentum, samples/s,
pseudo-labelled wells), rank 0 only.  A resumed run purges the events after the epoch it
resumes from, so a killed epoch leaves no stray points."""
from __future__ import annotations

import os

from common import run_layout
from common.distributed import Dist

# metrics.jsonl key -> TensorBoard tag
TAGS = {
    "train_loss": "loss/train", "valid_loss": "loss/valid",
    "train_accuracy01": "accuracy01/train", "valid_accuracy01": "accuracy01/valid",
    "valid_accuracy03": "accuracy03/valid",
    "lr": "schedule/lr", "momentum": "schedule/momentum",
    "images_per_s": "speed/samples_per_s",
    "pseudo_labelled": "pseudo/labelled_wells",
}


class TrainBoard:
    def __init__(self, cfg, d: Dist, resumed_epoch: int):
        self.writer = None
        if not d.is_main:
            return
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(os.path.join(cfg.run_dir, run_layout.TENSORBOARD),
                                    purge_step=resumed_epoch + 1 if resumed_epoch else None)

    def epoch(self, line: dict) -> None:
        if self.writer is None:
            return
        for key, tag in TAGS.items():
            value = line.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(tag, value, line["epoch"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
