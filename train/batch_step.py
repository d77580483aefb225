"""How one batch becomes logits and a loss: the reference's step, or with the techniques of
the plus and first recipes (train.techniques), each switched by its own config key:
- batch augmentations on the delivered batch (jitter, CutMix: train.techniques.batch_augment),
  whose CutMix makes soft targets and mixes the cell-type vectors with them;
- the cell type of each sample as a model input (model_params.cell_type_input);
- the ArcFace margin product (model_params.arcface): the loss becomes the 1st place's
  (1 - w) CE + w ArcFace / 2 (train.techniques.losses), the cosine taken from the
  model's second output so that DDP sees its parameters used in forward.

The augmentation's random draws come from one generator seeded from (seed, rank, epoch)
at the start of each epoch, as the loader's are: a resumed run draws the same ones.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from common.precision import autocast
from shards.layout import CELL_TYPES, N_SIRNAS, N_TREATMENTS
from train.config import RunConfig
from train.techniques.batch_augment import BatchAugment
from train.techniques.losses import first_place_loss


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
        self.aug = BatchAugment.from_params(jitter=dp["jitter"], cutmix=dp["cutmix"])
        self.model = model
        self.arcface = getattr(model, "arcface", None)
        self.with_aux = self.arcface is not None
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

    def _cells(self, rows, device) -> torch.Tensor | None:
        """(B,) cell-type indices of the rows, or None for a model without that input."""
        if self.cell_types is None:
            return None
        rows = torch.as_tensor(np.asarray(rows), dtype=torch.long)
        return self.cell_types[rows].to(device, non_blocking=True)

    def train(self, net, images, labels, rows, device, dtype):
        """(logits, loss) of a training batch; `net` may be the DDP wrapper."""
        targets, cell = labels, self._cells(rows, device)
        if self.aug.active:
            nhwc = images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last)
            if cell is not None:     # a vector, so that CutMix can mix it
                cell = torch.nn.functional.one_hot(cell, len(CELL_TYPES)).to(images.dtype)
            images, targets, cell = self.aug(images, labels, self.num_classes, self.generator,
                                             cell)
            if nhwc:
                images = images.contiguous(memory_format=torch.channels_last)
        extra = () if cell is None else (cell,)
        with autocast(device, dtype):
            out = net(images, *extra, with_aux=True) if self.with_aux else net(images, *extra)
        logits, cosine = out if self.with_aux else (out, None)
        logits = logits.float()
        if targets.dim() == 1 and not self.with_aux:   # hard labels: the reference's loss, exactly
            loss = self.criterion(logits, targets)
        else:
            a = self.arcface or {"weight": 0.0, "s": 0.0, "m": 0.0}
            loss = first_place_loss(logits, None if cosine is None else cosine.float(), targets,
                                    a["weight"], a["s"], a["m"], self.smoothing)
        return logits, loss

    def predict(self, model, images, rows, device, dtype) -> torch.Tensor:
        """Logits of the scored classes (float32) for validation."""
        cell = self._cells(rows, device)
        with autocast(device, dtype):
            logits = model(images, *(() if cell is None else (cell,)))
        return logits.float()[:, :self.scored_classes]
