"""How one batch becomes logits and a loss: the reference's step, or the plus recipe's.

The reference: label-smoothing cross-entropy on the logits of `model(images)`.
The plus recipe adds, each switched by its own config key:
- batch augmentations on the delivered batch (zoom, jitter, CutMix: train.batch_augment),
  whose CutMix makes soft targets (soft cross-entropy with the same smoothing);
- the cell type of each sample as a model input (model_params.cell_type_input);
- the ArcFace auxiliary loss (model_params.arcface), computed from the model's second
  output so that DDP sees its parameters used in forward.

The augmentation's random draws come from one generator seeded from (seed, rank, epoch)
at the start of each epoch, as the loader's are: a resumed run draws the same ones.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from common.precision import autocast
from shards.layout import N_SIRNAS, N_TREATMENTS
from train.batch_augment import BatchAugment, soft_cross_entropy
from train.config import RunConfig


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0])


class BatchStep:
    """One run's forward and loss; `model` is the unwrapped model (for its plus facts)."""

    def __init__(self, cfg: RunConfig, model: nn.Module, sites, rank: int):
        dp, cp = cfg.stages.data_params, cfg.stages.criterion_params
        self.num_classes = cfg.model_params.num_classes
        self.smoothing = cp.smoothing if cp.criterion == "LabelSmoothingCrossEntropy" else 0.0
        self.criterion = nn.CrossEntropyLoss(label_smoothing=self.smoothing)
        dp = dp.to_dict()
        self.aug = BatchAugment.from_params(zoom=dp["zoom"], jitter=dp["jitter"],
                                            cutmix=dp["cutmix"])
        self.model = model
        self.with_aux = getattr(model, "arcface_weight", 0.0) > 0
        # Cell type per row of the store's sites table (the loaders' rows point into it).
        self.cell_types = torch.as_tensor(model.cell_types_of_rows(sites)) \
            if getattr(model, "takes_cell_type", False) else None
        # Validation and accuracy read the siRNA columns only: the controls (classes
        # 1108..1138 of a 1139-class head) are never the answer for a treatment well.
        self.scored_classes = N_TREATMENTS if self.num_classes == N_SIRNAS else self.num_classes
        self.seed, self.rank = cfg.args.seed, rank
        self.generator = torch.Generator()

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(epoch_seed(self.seed, self.rank, epoch))

    def _inputs(self, rows, device) -> tuple:
        if self.cell_types is None:
            return ()
        rows = torch.as_tensor(np.asarray(rows), dtype=torch.long)
        return (self.cell_types[rows].to(device, non_blocking=True),)

    def train(self, net, images, labels, rows, device, dtype):
        """(logits, loss) of a training batch; `net` may be the DDP wrapper."""
        targets = labels
        if self.aug.active:
            nhwc = images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last)
            images, targets = self.aug(images, labels, self.num_classes, self.generator)
            if nhwc:
                images = images.contiguous(memory_format=torch.channels_last)
        extra = self._inputs(rows, device)
        with autocast(device, dtype):
            out = net(images, *extra, with_aux=True) if self.with_aux else net(images, *extra)
        logits, cosine = out if self.with_aux else (out, None)
        logits = logits.float()
        if targets.dim() == 1:     # hard labels: the reference's loss, exactly
            loss = self.criterion(logits, targets)
        else:
            loss = soft_cross_entropy(logits, targets, self.smoothing)
        if self.with_aux:
            loss = loss + self.model.aux_loss(cosine.float(), targets)
        return logits, loss

    def predict(self, model, images, rows, device, dtype) -> torch.Tensor:
        """Logits of the scored classes (float32) for validation."""
        with autocast(device, dtype):
            logits = model(images, *self._inputs(rows, device))
        return logits.float()[:, :self.scored_classes]
