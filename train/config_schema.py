"""What a training config may say: every key with its default, and the valid values.

The defaults are the reference solution's Part II (finetune) recipe as it
ran; configs/<part>.yml state only what differs per part.  The keys follow
the reference's catalyst configs (`model_params`, `stages.state_params`,
`stages.data_params`, `stages.stage0.optimizer_params` ...), plus what
cellshard adds (the shard store, normalization mode, site mode, loader
backend, mixed precision).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

from common.errors import BadInput
from common.precision import AMP_MODES  # noqa: F401  (the one list of amp settings)
from shards.layout import CONTROL_BASE, N_CONTROLS, N_TREATMENTS

PARTS = ("control", "finetune", "pseudo")
# The reference's `data_params.dataset` names of the three parts.
DATASET_OF_PART = {"control": "control", "finetune": "non_pseudo", "pseudo": "pseudo"}
NUM_CLASSES_OF_PART = {"control": N_CONTROLS, "finetune": N_TREATMENTS, "pseudo": N_TREATMENTS}
LABEL_OFFSET_OF_PART = {"control": CONTROL_BASE, "finetune": 0, "pseudo": 0}

# cell_plus: train.techniques.heads (the 1st place's head: cell type, neck, ArcFace).
MODELS = ("cell_senet", "cell_densenet", "cell_timm", "cell_plus")
OPTIMIZERS = ("Nadam", "Adam", "AdamW", "SGD")
CRITERIA = ("LabelSmoothingCrossEntropy", "CrossEntropyLoss")
METRICS = ("accuracy01", "accuracy03", "loss")
# model_params.pretrained: these two words, or a path to a weights file.
PRETRAINED_WORDS = ("imagenet", "none")
# Valid keys of scheduler_params per scheduler, with their defaults.
SCHEDULERS = {
    "MultiStepLR": {"milestones": [10], "gamma": 0.3},
    # The 1st place's `--lr cosine,v1,e1,v2,...`: a cosine per segment, set per iteration.
    "Cosine": {"segments": [1.5e-4]},
    "OneCycleLR": {"num_steps": 40, "lr_range": [5e-4, 1e-5], "warmup_steps": 5,
                   "momentum_range": [0.85, 0.95]},
    "none": {},
}
STAGE_NAME = re.compile(r"^stage\d+$")

DEFAULTS: dict[str, Any] = {
    # Marks a run of the plus recipe (configs/plus.yml); predict-all's TTA default is 8 then.
    "plus": False,
    "args": {
        "logdir": "./logs",
        "fold": 0,
        "seed": 42,
        "deterministic": False,   # True: same weights after a resume, slower on GPU
        "device": "auto",         # auto | cpu | cuda | cuda:N (torchrun: cuda:LOCAL_RANK)
        # auto: bf16 autocast where the device computes bf16 natively (GPUs; CPUs with
        # AVX-512 bf16/AMX), fp16 + GradScaler on GPUs without bf16, else fp32.
        "amp": "auto",
        "channels_last": "auto",  # auto = on (GPU and CPU); false = NCHW
        "progress": True,         # tqdm bar (rank 0)
        # Part II/III start from the control model of the same channel subset; none: from
        # model_params.pretrained instead, with no Part I (the 1st place's single run).
        "pretrained_control": "{logdir}/control/{channels}/{model_name}/checkpoints/best.pth",
    },
    "model_params": {
        "model": "cell_senet",
        "n_channels": 5,
        "num_classes": 1108,
        "model_name": "se_resnext50_32x4d",   # timm legacy_seresnext50_32x4d, the exact port
        # imagenet: timm's weights (hub or its cache); a path: a local RGB weights file;
        # none: random init.  Only Part I reads it (Parts II/III start from Part I).
        "pretrained": "imagenet",
        "drop_rate": 0.3,         # dropout before the last Linear, in training only
        # copy_rgb: RGB filters copied into the extra channels (the reference); new: a
        # fresh first conv (the 1st place)
        "first_conv": "copy_rgb",
        "bn_momentum": None,      # null: torch's 0.1; the 1st place: 0.05 on every BatchNorm
        # The 1st place's head (model: cell_plus, train.techniques.heads); off by default.
        "cell_type_input": False, # a one-hot of the 4 cell types beside the pooled features
        "neck": None,             # null | true | {dim}: BN-Linear-ReLU-BN-Linear-BN embedding
        "arcface": None,          # null | true | {s, m, weight}: the ArcFace margin product;
                                  # loss (1 - weight) CE + weight ArcFace / 2
    },
    "stages": {
        "state_params": {
            "main_metric": "accuracy03",
            "minimize_metric": False,
            # An optimizer step every N batches (gradients averaged over them).  The
            # reference's configs said 2 (Part II) and 4 (Part I), but catalyst 19.06
            # stepped when (counter + 1) % N == 0 with the counter reset at each step:
            # every batch for 2, every 3rd batch for 4.  These are the values that ran.
            "accumulation_steps": 1,
        },
        "criterion_params": {
            "criterion": "LabelSmoothingCrossEntropy",
            "smoothing": 0.1,
        },
        "data_params": {
            "batch_size": 64,           # global: each of N torchrun ranks takes batch_size / N
            "valid_batch_size": None,   # None = batch_size
            "num_workers": 8,
            "drop_last": False,
            "image_size": 512,
            "train_csv": "{shards}/csv/train_{fold}.csv",
            "valid_csv": "{shards}/csv/valid_{fold}.csv",
            "dataset": "non_pseudo",
            "shards": "./out/full",     # the store written by `python -m prep shards`
            "channels": [1, 2, 3, 4, 5],
            "sites": "random",          # training: random | two | one (or [1], [1,2] as in the reference)
            "site": 1,                  # the site of sites=one
            "norm": "site",
            "backend": "auto",
            "augment": True,            # flips, 90° rotations, transpose (+ the two below)
            "channel_dropout": 0.5,     # p of zeroing one channel (pixel value 0, before normalization)
            "shear_deg": 10.0,          # max shear angle in degrees (IAAAffine shear=(-10, 10))
            "shear_p": 0.5,             # p of a sheared sample
            # control: hold out the controls of valid_csv's experiments (see train/data.py)
            "control_holdout": True,
            # The techniques of the plus and first recipes (configs/plus.yml, first.yml); off.
            # Parts II/III: train also on the control wells, as classes 1108..1138
            # (needs model_params.num_classes 1139).
            "controls_as_classes": False,
            "cutmix": None,             # null | {p, beta}: one box per batch (train.techniques)
            "jitter": None,             # null | {p, scale_sd, shift_sd}
            "zoom": None,               # null | {p, min_side}: in the loader, before normalization
            # null | {start_epoch, size, grow_epoch, plate_groups}: test wells labelled inside
            # the run, in the last stage (train.techniques.pseudo_labels)
            "progressive_pseudo": None,
        },
        "stage0": {
            "state_params": {"num_epochs": 2},
            # backbone weights frozen, its BatchNorm still in train mode (as the reference)
            "freeze_backbone": True,
            "optimizer_params": {"optimizer": "Nadam", "lr": 1e-3, "weight_decay": 0.0},
            "scheduler_params": {"scheduler": "MultiStepLR", "milestones": [10], "gamma": 0.3},
        },
        "stage1": {
            "state_params": {"num_epochs": 40},
            "freeze_backbone": False,
            "optimizer_params": {"optimizer": "Nadam", "lr": 1e-4, "weight_decay": 0.0},
            "scheduler_params": {"scheduler": "OneCycleLR", "num_steps": 40,
                                 "lr_range": [5e-4, 1e-5], "warmup_steps": 5,
                                 "momentum_range": [0.85, 0.95]},
        },
    },
    "predict_params": {
        "tta": None,   # predict-all's default views (1, 2, 4 or 8); null = 8 for plus, else 1
    },
}
STAGE_DEFAULTS = {
    "state_params": {"num_epochs": 1},
    "freeze_backbone": False,
    "optimizer_params": {"optimizer": "Nadam", "lr": 1e-4, "weight_decay": 0.0},
    "scheduler_params": {"scheduler": "none"},
}

# Keys that may differ between the config that started a run and the one that
# resumes it (or finds it finished): where and how it runs, not what it trains.
# Everything else (data, model, schedule, seed, criterion ...) must match.
HARMLESS_KEYS = (
    "args.logdir", "args.progress", "args.device", "args.amp", "args.channels_last",
    "args.deterministic", "args.pretrained_control",
    "stages.data_params.num_workers", "stages.data_params.backend",
    "stages.data_params.valid_batch_size",
    "plus", "predict_params.tta",      # prediction's defaults, not what trains
)


class ConfigError(BadInput):
    """A config that cannot run; the message names the key and what is wrong."""


def stage_names(cfg: Mapping) -> list[str]:
    """stage0, stage1, ... of a resolved config, in order."""
    names = [k for k in cfg["stages"] if STAGE_NAME.match(str(k))]
    return sorted(names, key=lambda n: int(n[5:]))
