"""Optimizers and learning-rate schedules of the recipe.

Nadam is torch's NAdam (the same algorithm as the Keras/catalyst Nadam the
reference used, momentum_decay 4e-3).  The one-cycle schedule follows
catalyst's OneCycleLRWithWarmup as the reference configured it: `num_steps`
and `warmup_steps` count epochs, the schedule advances per optimizer step.
"""
from __future__ import annotations

import math

import torch


def make_optimizer(params, optimizer="Nadam", lr=1e-4, weight_decay=0.0):
    params = [p for p in params if p.requires_grad]
    if optimizer == "Nadam":
        return torch.optim.NAdam(params, lr=lr, weight_decay=weight_decay)
    if optimizer == "Adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if optimizer == "AdamW":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if optimizer == "SGD":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    raise ValueError(f"unknown optimizer {optimizer!r}")


class OneCycleWithWarmup:
    """Linear warmup from the optimizer's lr to lr_range[0] over `warmup_steps`
    epochs, then linear annealing to lr_range[1] by the end of `num_steps`
    epochs.  Momentum (beta1 for Adam-type optimizers) moves the other way: in
    the warm-up from the optimizer's own value (Nadam's 0.9, as catalyst read
    it) to momentum_range[0], then up to momentum_range[1].  Steps past the end
    hold the final values."""

    per_step = True

    def __init__(self, optimizer, steps_per_epoch, num_steps, lr_range, warmup_steps=0,
                 momentum_range=(0.85, 0.95)):
        self.optimizer = optimizer
        self.total = max(1, int(num_steps) * int(steps_per_epoch))
        self.warmup = int(warmup_steps) * int(steps_per_epoch)
        self.lr_max, self.lr_min = float(lr_range[0]), float(lr_range[1])
        self.m_min, self.m_max = float(momentum_range[0]), float(momentum_range[1])
        self.init_lrs = [g["lr"] for g in optimizer.param_groups]
        self.init_moms = [g["betas"][0] if "betas" in g else g.get("momentum", self.m_max)
                          for g in optimizer.param_groups]
        self.step_count = 0
        self._apply()

    def values(self, t: int, init_lr: float, init_m: float) -> tuple[float, float]:
        if t < self.warmup:
            f = t / self.warmup
            return init_lr + (self.lr_max - init_lr) * f, init_m + (self.m_min - init_m) * f
        span = max(1, self.total - self.warmup - 1)
        f = min(1.0, (t - self.warmup) / span)
        return self.lr_max + (self.lr_min - self.lr_max) * f, self.m_min + (self.m_max - self.m_min) * f

    def _apply(self):
        for g, init, init_m in zip(self.optimizer.param_groups, self.init_lrs, self.init_moms):
            lr, mom = self.values(self.step_count, init, init_m)
            g["lr"] = lr
            if "betas" in g:
                g["betas"] = (mom, g["betas"][1])
            elif "momentum" in g:
                g["momentum"] = mom

    def step(self):
        self.step_count += 1
        self._apply()

    def get_last_lr(self):
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self):
        return {"step_count": self.step_count, "init_lrs": list(self.init_lrs),
                "init_moms": list(self.init_moms)}

    def load_state_dict(self, state):
        self.step_count = int(state["step_count"])
        self.init_lrs = list(state["init_lrs"])
        self.init_moms = list(state.get("init_moms", self.init_moms))
        self._apply()


class CosineSegments:
    """The 1st place's `--lr cosine,v1,e1,v2,e2,...,vn` (main.py:118-122, 237-250 of
    maciej-sypetkowski/kaggle-rcic-1st): in [0, e1) a half cosine from v1 down to 0
    reached at e1, in [e1, e2) one from v2 (the restart), ..., the last ending at the
    stage's last epoch.  Set per iteration from the fractional epoch, so an epoch that
    grows (pseudo-labelled wells joining it) keeps the curve: `position(epoch + i / n)`
    before each optimizer step, i the batch of the step (its `epoch + i / len(loader)`)."""

    per_step = False
    by_position = True

    def __init__(self, optimizer, num_epochs, segments):
        values, breaks = [float(v) for v in segments[::2]], [float(e) for e in segments[1::2]]
        self.optimizer = optimizer
        self.starts = [0.0] + breaks
        self.ends = breaks + [float(num_epochs)]
        self.values = values
        self.position(0.0)

    def value(self, epoch: float) -> float:
        for start, end, lr in zip(self.starts, self.ends, self.values):
            if start <= epoch < end:
                return lr * (math.cos((epoch - start) / (end - start) * math.pi) + 1) / 2
        return 0.0   # past the end (main.py asserts; a resumed epoch's tail cannot get here)

    def position(self, epoch: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = self.value(epoch)

    def step(self):
        pass

    def get_last_lr(self):
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class EpochScheduler:
    """A torch epoch scheduler (MultiStepLR) behind the same step interface."""

    per_step = False

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def step(self):
        self.scheduler.step()

    def get_last_lr(self):
        return self.scheduler.get_last_lr()

    def state_dict(self):
        return self.scheduler.state_dict()

    def load_state_dict(self, state):
        self.scheduler.load_state_dict(state)


class NoScheduler:
    per_step = False

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def step(self):
        pass

    def get_last_lr(self):
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def make_scheduler(optimizer, steps_per_epoch: int, scheduler="none", num_epochs: int = 1,
                   **params):
    if scheduler == "Cosine":
        return CosineSegments(optimizer, num_epochs, params["segments"])
    if scheduler == "OneCycleLR":
        return OneCycleWithWarmup(optimizer, steps_per_epoch, **params)
    if scheduler == "MultiStepLR":
        return EpochScheduler(torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=list(params["milestones"]), gamma=params["gamma"]))
    if scheduler == "none":
        return NoScheduler(optimizer)
    raise ValueError(f"unknown scheduler {scheduler!r}")
