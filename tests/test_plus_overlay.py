"""configs/plus.yml says what the plus modules read: every technique on, parsed by its module."""
from __future__ import annotations

import os

import yaml

from infer.predict import run_tta
from train.batch_augment import BatchAugment
from train.heads import arcface_params
from train.progressive_pseudo import ProgressiveSchedule

PLUS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                    "plus.yml")


def test_the_overlay_turns_every_technique_on():
    cfg = yaml.safe_load(open(PLUS))
    mp, dp = cfg["model_params"], cfg["stages"]["data_params"]
    assert mp["model"] == "cell_plus" and mp["num_classes"] == 1139 and mp["cell_type_input"]
    assert dp["controls_as_classes"] is True
    assert arcface_params(mp["arcface"]) == {"s": 30.0, "m": 0.5, "dim": 512, "weight": 0.2}
    aug = BatchAugment.from_params(zoom=dp["zoom"], jitter=dp["jitter"], cutmix=dp["cutmix"])
    assert (aug.p_cutmix, aug.beta, aug.p_jitter, aug.scale_sd, aug.shift_sd, aug.p_zoom,
            aug.min_side) == (1.0, 1.0, 1.0, 0.1, 0.1, 1.0, 0.5)
    sched = ProgressiveSchedule.from_params(dp["progressive_pseudo"])
    assert sched.share(sched.start_epoch - 1) == 0 and sched.share(sched.full_epoch) == 1
    assert run_tta(None, {"config": cfg}) == 8
    assert "model_name" not in mp   # the overlay keeps whatever backbone the base config has
