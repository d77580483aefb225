"""A run's bookkeeping across stages, epochs and restarts: what has been trained,
what to resume, what to save.

- A re-run of a finished run is skipped, a killed one resumes from last.pth,
  but only when the config that trains matches the one that ran
  (`config.changed_keys`): otherwise it stops, naming the keys.
- Each stage gets a fresh optimizer and scheduler; a stage after the first
  starts from the previous stage's best.pth, and best.pth is then chosen among
  its own epochs (catalyst did both).
- Every epoch: last.pth (everything an exact resume needs), best.pth when the
  main metric improved, metrics.jsonl and curves.png; at the end finished.json.
  All through the one atomic write (checkpoints fsynced); only rank 0 writes.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import yaml

from common import run_layout
from common.distributed import Dist
from shards.atomic import write_bytes
from train import checkpoint as ckpt
from train.config import RunConfig, changed_keys, dump_yaml
from train.config_schema import ConfigError
from train.plots import plot_curves


@dataclass
class RunState:
    """Where a run stands: epochs done (all stages), optimizer steps, the current stage's
    best, the metric history, and on a resume the checkpoint to continue from."""
    epoch: int = 0
    global_step: int = 0
    best: dict | None = None
    history: list = field(default_factory=list)
    init_from: str | None = None
    resume: dict | None = None          # last.pth of a killed run
    pending_rng: dict | None = None     # its RNG state, set once all set-up is done

    def main_value(self, metrics: dict, main_metric: str) -> float:
        return metrics["valid_loss" if main_metric == "loss" else f"valid_{main_metric}"]

    def record(self, cfg: RunConfig, stage: "Stage", stage_epoch: int, lr: float, tm: dict,
               vm: dict) -> dict:
        """Count the epoch, update the stage's best, append and return its history line."""
        sp = cfg.stages.state_params
        self.epoch += 1
        self.global_step += tm["optimizer_steps"]
        value = self.main_value(vm, sp.main_metric)
        is_best = self.best is None or (value < self.best["value"] if sp.minimize_metric
                                        else value > self.best["value"])
        if is_best:
            self.best = {"value": value, "epoch": self.epoch, "metric": sp.main_metric,
                         "stage": stage.name}
        line = {"epoch": self.epoch, "stage": stage.name, "stage_epoch": stage_epoch + 1,
                "step": self.global_step, "lr": lr, **tm, **vm, "is_best": is_best}
        self.history.append(line)
        return line


@dataclass(frozen=True)
class Stage:
    index: int
    name: str
    first_epoch: int      # epochs of all earlier stages
    n_epochs: int
    is_last: bool


def paths(cfg: RunConfig) -> tuple[str, str]:
    """(last.pth, best.pth) of the run."""
    return (run_layout.checkpoint_path(cfg.run_dir, run_layout.LAST),
            run_layout.checkpoint_path(cfg.run_dir, run_layout.BEST))


def _refuse_if_changed(saved: dict, cfg: RunConfig, what: str) -> None:
    diff = changed_keys(saved, cfg.to_dict())
    if diff:
        shown = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, a, b in diff[:6])
        more = f" (+{len(diff) - 6} more)" if len(diff) > 6 else ""
        raise ConfigError(f"{cfg.run_dir} {what} with other settings — {shown}{more}; use a new "
                          "--logdir to train something else, or the same settings to continue")


def prior_state(cfg: RunConfig) -> RunState | None:
    """None when the run finished before (skip it); else a fresh or resumed RunState."""
    last_path, best_path = paths(cfg)
    if run_layout.is_finished(cfg.run_dir):
        config_yml = os.path.join(cfg.run_dir, run_layout.CONFIG)
        if os.path.isfile(config_yml):
            with open(config_yml) as f:
                saved = yaml.safe_load(f)
        else:
            saved = ckpt.load(best_path)["config"]
        _refuse_if_changed(saved, cfg, "finished")
        return None
    if not os.path.isfile(last_path):
        return RunState()
    ck = ckpt.load(last_path)
    _refuse_if_changed(ck["config"], cfg, "was trained")
    return RunState(epoch=ck["epoch"], global_step=ck["global_step"], best=ck["best"],
                    history=list(ck["history"]), init_from=ck.get("init_from"), resume=ck)


def pick_rng(state: RunState, d: Dist) -> None:
    if state.resume is not None:
        rngs = state.resume["rng"]
        state.pending_rng = rngs[d.rank] if len(rngs) == d.world_size else rngs[0]


def remaining(cfg: RunConfig, state: RunState):
    """The stages with epochs left to train, in order."""
    names = cfg.stage_names
    first = 0
    for i, name in enumerate(names):
        n = cfg.stages[name].state_params.num_epochs
        stage = Stage(i, name, first, n, i == len(names) - 1)
        first += n
        if n and state.epoch < first:
            yield stage


def resumes_inside(stage: Stage, state: RunState) -> bool:
    """True when last.pth stopped inside `stage` (its optimizer and scheduler carry on)."""
    r = state.resume
    return r is not None and r["stage"] == stage.name and state.epoch > stage.first_epoch


def begin(cfg: RunConfig, d: Dist) -> None:
    """Create the run folder and write the config that trains it (rank 0)."""
    if not d.is_main:
        return
    ck_dir = os.path.join(cfg.run_dir, run_layout.CHECKPOINTS_DIR)
    try:
        os.makedirs(ck_dir, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"args.logdir {cfg.args.logdir}: cannot create {ck_dir}; a file is in "
                          "the way (give a directory)") from None
    dump_yaml(cfg, os.path.join(cfg.run_dir, run_layout.CONFIG))


def save_epoch(cfg: RunConfig, state: RunState, stage: Stage, line: dict, model_state: dict,
               optimizer, scheduler, scaler, rngs: list, d: Dist, extra: dict | None = None) -> None:
    """best.pth (if this epoch is the stage's best), last.pth, metrics.jsonl, curves.png.
    `extra`: more of what a resume needs, into last.pth (progressive pseudo labels)."""
    if not d.is_main:
        return
    last_path, best_path = paths(cfg)
    head = {"format": ckpt.FORMAT, "format_version": ckpt.FORMAT_VERSION,
            "model_state_dict": model_state, "config": cfg.to_dict(), "epoch": state.epoch,
            "stage": stage.name, "best": state.best, "init_from": state.init_from}
    if line["is_best"]:
        ckpt.save({**head, "metrics": line}, best_path)
    finished = stage.is_last and state.epoch == stage.first_epoch + stage.n_epochs
    ckpt.save({**head, "optimizer_state_dict": optimizer.state_dict(),
               "scheduler_state_dict": scheduler.state_dict(),
               "scaler_state_dict": scaler.state_dict(), "stage_index": stage.index,
               "global_step": state.global_step, "history": state.history, "rng": rngs,
               "finished": finished, **(extra or {})}, last_path)
    write_bytes(os.path.join(cfg.run_dir, run_layout.METRICS),
                "".join(json.dumps(h) + "\n" for h in state.history))
    plot_curves(state.history, os.path.join(cfg.run_dir, run_layout.CURVES))


def finish(cfg: RunConfig, state: RunState, d: Dist) -> None:
    """finished.json marks the run complete (written after the final last.pth)."""
    if d.is_main:
        write_bytes(run_layout.checkpoint_path(cfg.run_dir, run_layout.FINISHED),
                    json.dumps({"epochs": state.epoch, "best": state.best}), durable=True)
