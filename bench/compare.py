"""`make compare` — the reference recipe against the plus recipe (configs/plus.yml), and each
plus technique alone on top of the reference, on the demo preset with the demo's model and
budget (configs/demo.yml), through predict-all and the plate-constrained ensemble.

    python -m bench.compare [--seeds 0,1,2] [--techniques all|none|cutmix,arcface,...]
                            [--technique-seeds 0,1,2] [--channels "[1,2,3,4,5]"] [--folds 0]
                            [--out-dir compare_out] [--workers N]
                            [--config-overrides configs/demo.yml[,configs/demo_long.yml]]
                            [--results bench/results_compare.json]
                            [--plus-without none|cutmix,zoom,...]
                            [--first-without none|norm,progressive_pseudo,augment]

Per data seed: synth (preset demo, that seed) -> shards -> folds -> one Part I (control)
model, which every recipe of that seed starts from -> for each recipe a Part II run per
fold -> predict-all (each run's own TTA: 8 for the plus recipe and the `tta` technique,
else 1) -> ensemble -> test accuracy with and without the plate assignment.  The reference
and the plus recipe run on every seed of --seeds; each technique alone on --technique-seeds.
Every step is the real command (printed; its output in OUT/compare.log); finished steps are
skipped on a re-run.  Writes bench/results_compare.json and its table into bench/results.md
(through bench.report).  About an hour on a 2-core CPU host: a benchmark, not a test.
`make compare-long` runs the two recipes with stage1 three times as long
(configs/demo_long.yml) into bench/results_compare_long.json.  The progressive pseudo labels
are fitted to stage1's epochs (progressive_epochs).
"""
from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
import time

import yaml

from common.arglists import parse_folds, parse_names, parse_subsets
from common.errors import BadInput
from common.run_layout import channels_dirname
from bench.compare_table import format_table, summarize  # noqa: F401 (tests, report)
from shards.atomic import write_bytes

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable
RESULTS = os.path.join(HERE, "results_compare.json")
PLUS_YML = os.path.join(ROOT, "configs", "plus.yml")
FIRST_YML = os.path.join(ROOT, "configs", "first.yml")
FIRST_CHANNELS = "[1,2,3,4,5,6]"     # the 1st place's one model reads all six channels
DEMO_YML = "configs/demo.yml"
DEMO_STAGE1_EPOCHS = 5


def progressive_epochs(stage1_epochs: int) -> dict:
    """The 1st place labels from epoch 90 of 130; a shorter stage1 starts at the same share
    of its epochs (the demo's 5: from the 4th), never before its 2nd."""
    return {"start_epoch": max(1, round(90 / 130 * stage1_epochs))}


def stage1_epochs(config_overrides: str) -> int:
    """Stage1's epochs of Part II under `config_overrides` (what the progressive labels fit)."""
    from train.config import load_config
    cfg = load_config("finetune", os.path.join(ROOT, "configs", "finetune.yml"),
                      overrides=config_overrides)
    return int(cfg.stages.stage1.state_params.num_epochs)


def _plus(epochs: int = DEMO_STAGE1_EPOCHS, without=()) -> dict:
    """configs/plus.yml (progressive labels fitted to `epochs`), less the techniques
    `without` names."""
    with open(PLUS_YML) as f:
        plus = yaml.safe_load(f)
    mp, dp = plus["model_params"], plus["stages"]["data_params"]
    dp["progressive_pseudo"].update(progressive_epochs(epochs))
    for t in without:
        if t == "controls_as_classes":
            del mp["num_classes"]
            dp["controls_as_classes"] = False
        elif t == "cell_type":
            mp["cell_type_input"] = False
        elif t == "arcface":
            del mp["arcface"]
        elif t == "neck":
            del mp["neck"]
        elif t == "bn_momentum":
            del mp["bn_momentum"]
        elif t == "tta":
            plus["predict_params"]["tta"] = 1
        else:
            del dp[t]
    return plus


# What `--first-without` can take out of the 1st place's recipe, one at a time: each named
# variant is first.yml less that part, so the table shows what the part costs or gives.
FIRST_PARTS = {
    "norm": ("norm",),                                # per-sample statistics -> the config's
    "progressive_pseudo": ("progressive_pseudo",),    # no pseudo-labelled test wells
    "augment": ("cutmix", "zoom", "jitter"),          # flips and transpose only
}


def parse_first_without(value) -> list[str]:
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return []
    names = parse_names(value, "--first-without")
    bad = [n for n in names if n not in FIRST_PARTS]
    if bad:
        raise BadInput(f"--first-without: unknown {bad}; choose from "
                       f"{', '.join(FIRST_PARTS)} or none")
    return names


def _first(config_overrides: str, without: str | None = None) -> dict:
    """configs/first.yml at the budget of `config_overrides` (what the reference trains there):
    the same stage1 epochs, its schedule's breaks (90 and 150 of 130 epochs) and its pseudo
    labels scaled to them, its learning rates scaled as the budget scales the reference's
    (stage1's peak over the reference's 5e-4), no downloaded weights.  `without`: a key of
    FIRST_PARTS left out (its data_params keys deleted, so the config's own values hold)."""
    from train.config import load_config
    cfg = load_config("finetune", os.path.join(ROOT, "configs", "finetune.yml"),
                      overrides=config_overrides)
    s1 = cfg.stages.stage1
    epochs = int(s1.state_params.num_epochs)
    sch = s1.scheduler_params.to_dict()
    scale = sch["lr_range"][0] / 5e-4 if sch["scheduler"] == "OneCycleLR" else 1.0
    with open(FIRST_YML) as f:
        first = yaml.safe_load(f)
    v1, b1, v2, b2, v3 = first["stages"]["stage1"]["scheduler_params"]["segments"]
    first["model_params"]["pretrained"] = "none"
    st = first["stages"]["stage1"]
    st["state_params"]["num_epochs"] = epochs
    st["optimizer_params"]["lr"] = v1 * scale
    st["scheduler_params"]["segments"] = [v1 * scale, max(1, round(b1 / 130 * epochs)),
                                          v2 * scale, round(b2 / 130 * epochs), v3]
    first["stages"]["data_params"]["progressive_pseudo"]["start_epoch"] = \
        max(1, round(b1 / 130 * epochs))
    for key in FIRST_PARTS[without] if without else ():
        del first["stages"]["data_params"][key]
    return first


def plus_name(without=()) -> str:
    """The plus recipe's name in the table: `plus`, or `plus-cutmix-zoom` without those."""
    return "-".join(["plus", *without])


def technique_overlays(epochs: int = DEMO_STAGE1_EPOCHS) -> dict[str, dict]:
    """Each technique alone, with the values of configs/plus.yml (progressive pseudo labels
    fitted to a stage1 of `epochs` epochs)."""
    plus = _plus(epochs)
    mp, dp = plus["model_params"], plus["stages"]["data_params"]

    def data(**kw):
        return {"stages": {"data_params": kw}}
    # `tta` trains nothing: the reference's runs predicted with TTA 8 (see Pipeline.recipe).
    return {
        "controls_as_classes": {"model_params": {"num_classes": mp["num_classes"]},
                                **data(controls_as_classes=True)},
        "cell_type": {"model_params": {"model": "cell_plus", "cell_type_input": True}},
        "neck": {"model_params": {"model": "cell_plus", "cell_type_input": False,
                                  "neck": mp["neck"]}},
        "arcface": {"model_params": {"model": "cell_plus", "cell_type_input": False,
                                     "arcface": mp["arcface"]}},
        "bn_momentum": {"model_params": {"bn_momentum": mp["bn_momentum"]}},
        "cutmix": data(cutmix=dp["cutmix"]),
        "jitter": data(jitter=dp["jitter"]),
        "zoom": data(zoom=dp["zoom"]),
        "progressive_pseudo": data(progressive_pseudo=dp["progressive_pseudo"]),
        "tta": {"predict_params": {"tta": plus["predict_params"]["tta"]}},
    }


TECHNIQUES = tuple(technique_overlays())


def parse_techniques(value, option: str = "--techniques") -> list[str]:
    if value is None or (isinstance(value, str) and value.strip().lower() == "all"):
        return list(TECHNIQUES)
    if isinstance(value, str) and value.strip().lower() == "none":
        return []
    names = parse_names(value, option)
    bad = [n for n in names if n not in TECHNIQUES]
    if bad:
        raise BadInput(f"{option}: unknown {bad}; choose from {', '.join(TECHNIQUES)}, "
                       "all or none")
    return names


def plan(seeds: list[int], techniques: list[str], technique_seeds: list[int], plus="plus",
         first: bool = True, first_without=()):
    """(recipe, seed) pairs in the order they run: per seed the reference, plus, first,
    first less each part of `first_without` (`first-norm`, ...), techniques."""
    out = []
    for s in seeds + [t for t in technique_seeds if t not in seeds]:
        if s in seeds:
            out += [("reference", s), (plus, s)] + ([("first", s)] if first else [])
            out += [(f"first-{part}", s) for part in first_without]
        if s in technique_seeds:
            if s not in seeds and "tta" in techniques:
                out.append(("reference", s))   # +tta predicts the reference's runs
            out += [(f"+{t}", s) for t in techniques]
    return out


# ------------------------------------------------------------------ the pipeline

class Pipeline:
    def __init__(self, out_dir, subsets, folds, model_name, workers, log, preset, overrides,
                 tta8=True):
        self.out, self.subsets, self.folds, self.tta8 = out_dir, subsets, folds, tta8
        self.preset, self.overrides = preset, overrides
        self.model, self.workers, self.log = model_name, str(workers), log

    def run(self, cmd: list[str]) -> None:
        line = " ".join(shlex.quote(c) for c in cmd)
        print(f"$ {line}", flush=True)
        self.log.write(f"$ {line}\n")
        self.log.flush()
        if subprocess.run(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT).returncode:
            raise SystemExit(f"compare: step failed: {line}\nsee the log: {self.log.name}")

    def seed_dir(self, seed: int) -> str:
        return os.path.join(self.out, f"seed_{seed}")

    def prepare(self, seed: int) -> None:
        """Data, store, folds and the control models of one data seed."""
        d = self.seed_dir(seed)
        data, store = os.path.join(d, "data"), os.path.join(d, "store")
        if not os.path.isfile(os.path.join(data, "synth.json")):
            self.run([PY, "-m", "prep", "synth", "--preset", self.preset, "--seed", str(seed),
                      "--out-dir", data, "--workers", self.workers])
        self.run([PY, "-m", "prep", "shards", "--data-dir", data, "--out-dir", store,
                  "--workers", self.workers])
        self.run([PY, "-m", "prep", "folds", "--data-dir", data, "--n-folds", "5",
                  "--out-dir", os.path.join(store, "csv")])
        for c in self.subsets:
            self.run([PY, "-m", "train", "control", "--channels", c, "--overrides", self.overrides,
                      "--shards", store, "--logdir", os.path.join(d, "logs", "control"),
                      "--model-name", self.model])

    def recipe(self, name: str, seed: int, overlay: str | None) -> dict:
        """Part II of one recipe on one seed, predicted and ensembled; its scores."""
        from infer import score_submission
        d = self.seed_dir(seed)
        data, store = os.path.join(d, "data"), os.path.join(d, "store")
        # TTA alone changes no training: the reference's runs, predicted with 8 views.
        tta_only = name == "+tta"
        logs = os.path.join(d, "logs", "reference" if tta_only else name)
        pred = os.path.join(d, "pred", name)
        control = os.path.join(d, "logs", "control", "control", "{channels}", "{model_name}",
                               "checkpoints", "best.pth")
        overrides = self.overrides + (f",{overlay}" if overlay else "")
        t0 = time.time()
        # first (and its variants): one six-channel model per fold, from its own start
        is_first = name == "first" or name.startswith("first-")
        subsets = [FIRST_CHANNELS] if is_first else self.subsets
        start = [] if is_first else [f"--args.pretrained_control={control}"]
        for c in subsets if not tta_only else ():
            for k in self.folds:
                self.run([PY, "-m", "train", "finetune", "--channels", c, "--fold", str(k),
                          "--overrides", overrides, "--shards", store, "--logdir", logs,
                          "--model-name", self.model, *start])
        # every recipe predicted with TTA 8: the comparison is about training alone
        self.run([PY, "-m", "infer", "predict-all", "--shards", store, "--data-dir", data,
                  "--model-root", os.path.join(logs, "finetune"), "--model-name", self.model,
                  "--out-dir", pred, "--overwrite"]
                 + (["--tta", "8"] if (tta_only or self.tta8) else []))
        sub = os.path.join(pred, "submission.csv")
        self.run([PY, "-m", "infer", "ensemble", "--data-dir", data, "--predict-root", pred,
                  "--out", sub, "--overwrite"])  # the demo's own outputs, redone on a re-run
        s = score_submission(sub, data)["all"]
        return {"recipe": name, "seed": seed, "no_assignment": s["argmax (no assignment)"],
                "plate_assignment": s["submission"], "wells": s["n"],
                "seconds": round(time.time() - t0, 1)}


def _write_overlays(out_dir: str, epochs: int, without=(), config_overrides=DEMO_YML
                    ) -> dict[str, str]:
    """The overlay file of every recipe but the reference (plus, first, first-part,
    +technique)."""
    os.makedirs(out_dir, exist_ok=True)
    files = {plus_name(without): _plus(epochs, without), "first": _first(config_overrides),
             **{f"first-{part}": _first(config_overrides, part) for part in FIRST_PARTS},
             **{f"+{t}": o for t, o in technique_overlays(epochs).items()}}
    paths = {}
    for name, overlay in files.items():
        path = os.path.join(out_dir, f"overlay_{name.lstrip('+')}.yml")
        write_bytes(path, yaml.safe_dump(overlay, sort_keys=False))
        paths[name] = path
    return paths


def main(seeds="0,1,2", techniques="all", technique_seeds="0,1,2", channels="[1,2,3,4,5]",
         folds="0", out_dir="compare_out", model_name="resnet18", workers: int | None = None,
         results=RESULTS, preset="demo", config_overrides=DEMO_YML, plus_without="none",
         first=True, tta8=True, first_without="none"):
    """Train, predict and score the reference recipe, the plus recipe and each technique
    alone (see the module's help); write the table.  --plus-without cutmix,zoom: the plus
    recipe less those techniques, in the plus recipe's place.  --preset tiny
    --config-overrides configs/tiny.yml --model-name test_resnet --results OUT.json: a smoke
    run in minutes.  --first false leaves the 1st place's recipe out; --tta8 false predicts
    each run with its own TTA (8 for plus, else 1) instead of 8 for all.  --first-without
    norm,progressive_pseudo,augment adds, per seed, the 1st place's recipe less each of those
    parts (`first-norm`: the config's normalization in place of per-sample statistics;
    `first-augment`: no CutMix, zoom or jitter)."""
    seed_list = parse_folds(seeds, None, "--seeds")
    tech_seeds = parse_folds(technique_seeds, None, "--technique-seeds")
    techs = parse_techniques(techniques)
    without = tuple(parse_techniques(plus_without, "--plus-without"))
    first_parts = parse_first_without(first_without)
    if len(without) == len(TECHNIQUES):
        raise BadInput("--plus-without: that leaves nothing of the plus recipe (the reference "
                       "is measured anyway); name some techniques, or none")
    subsets = [channels_dirname(s) for s in parse_subsets(channels, "--channels")]
    fold_list = parse_folds(folds, 5, "--folds")
    out_dir = os.path.abspath(out_dir)
    overlays = _write_overlays(out_dir, stage1_epochs(config_overrides), without,
                               config_overrides)
    from bench.report import machine
    log = open(os.path.join(out_dir, "compare.log"), "a")
    p = Pipeline(out_dir, subsets, fold_list, model_name, workers or os.cpu_count() or 1, log,
                 preset, config_overrides, bool(tta8))
    done = {}
    if os.path.isfile(results):   # a re-run keeps what an earlier one measured with this plan
        with open(results) as f:
            old = json.load(f)
        oc = old.get("config", {})
        if (oc.get("out_dir"), oc.get("preset"), oc.get("overrides")) == (out_dir, preset,
                                                                           config_overrides):
            done = {(r["recipe"], r["seed"]): r for r in old["runs"]}
    config = {"preset": preset, "model": model_name, "channels": subsets, "folds": fold_list,
              "seeds": seed_list, "technique_seeds": tech_seeds, "techniques": techs,
              "overrides": config_overrides, "plus_without": list(without), "out_dir": out_dir,
              "tta": "8 for every recipe" if tta8 else "each run's own",
              "first_without": first_parts}
    runs, prepared = [], set()
    for name, seed in plan(seed_list, techs, tech_seeds, plus_name(without), bool(first),
                           first_parts if first else ()):
        if (name, seed) not in done:
            if seed not in prepared:
                p.prepare(seed)
                prepared.add(seed)
            done[(name, seed)] = p.recipe(name, seed, overlays.get(name))
        runs.append(done[(name, seed)])
        out = {"config": config, "machine": machine(), "runs": runs}
        write_bytes(results, json.dumps(out, indent=1))   # after every recipe: a partial table
    print("\n" + format_table(out))
    from bench import report
    if os.path.abspath(results) in map(report.result_path, report.COMPARE_PARTS):
        report.main()     # bench/results.md shows the three bench/results_compare*.json only
    else:
        print(f"wrote {results}")


if __name__ == "__main__":
    from common.cli import run_command
    run_command("bench.compare", main)
