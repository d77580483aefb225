"""One training run's configuration: YAML + overrides, checked once, then read-only.

The keys follow the reference solution's catalyst configs (`model_params`,
`stages.state_params`, `stages.data_params`, `stages.stage0.optimizer_params`
...), plus what cellshard adds (the shard store, normalization mode, site mode,
loader backend, mixed precision).  Everything that can be wrong in a config is
found here, with the file and key named, before any data is read.

`load_config(part, ...)` is the only entry point; it returns a `Config`, a
read-only view with attribute access over the resolved nested dict.
"""
from __future__ import annotations

from common.errors import BadInput

import copy
import os
import re
from typing import Any, Mapping

import yaml

from common.run_layout import channels_dirname
from shards.layout import CONTROL_BASE, N_CONTROLS, N_TREATMENTS, NORM_MODES, parse_channels

PARTS = ("control", "finetune", "pseudo")
# The reference's `data_params.dataset` names of the three parts.
DATASET_OF_PART = {"control": "control", "finetune": "non_pseudo", "pseudo": "pseudo"}
NUM_CLASSES_OF_PART = {"control": N_CONTROLS, "finetune": N_TREATMENTS, "pseudo": N_TREATMENTS}
LABEL_OFFSET_OF_PART = {"control": CONTROL_BASE, "finetune": 0, "pseudo": 0}

MODELS = ("cell_senet", "cell_densenet", "cell_timm")
OPTIMIZERS = ("Nadam", "Adam", "AdamW", "SGD")
CRITERIA = ("LabelSmoothingCrossEntropy", "CrossEntropyLoss")
METRICS = ("accuracy01", "accuracy03", "loss")
SITE_MODES = ("random", "two", "one")
AMP_MODES = ("auto", "bf16", "fp16", "none")
BACKENDS = ("auto", "dali", "torch")
# Valid keys of scheduler_params per scheduler, with their defaults.
SCHEDULERS = {
    "MultiStepLR": {"milestones": [10], "gamma": 0.3},
    "OneCycleLR": {"num_steps": 40, "lr_range": [5e-4, 1e-5], "warmup_steps": 5,
                   "momentum_range": [0.85, 0.95]},
    "none": {},
}
_STAGE_NAME = re.compile(r"^stage\d+$")

# Every valid key with its default.  Values are the reference's Part II
# (finetune) settings; configs/<part>.yml state what differs per part.
DEFAULTS: dict[str, Any] = {
    "args": {
        "logdir": "./logs",
        "fold": 0,
        "seed": 42,
        "deterministic": False,   # True: same weights after a resume, slower on GPU
        "device": "auto",         # auto | cpu | cuda | cuda:N (torchrun: cuda:LOCAL_RANK)
        "amp": "auto",            # auto = bf16 autocast; fp16 uses a GradScaler (GPU)
        "channels_last": "auto",  # auto = on (GPU and CPU); false = NCHW
        "progress": True,         # tqdm bar (rank 0)
        # Part II/III start from the control model of the same channel subset.
        "pretrained_control": "{logdir}/control/{channels}/{model_name}/checkpoints/best.pth",
    },
    "model_params": {
        "model": "cell_senet",
        "n_channels": 5,
        "num_classes": 1108,
        "model_name": "se_resnext50_32x4d",
        "pretrained": None,       # local RGB weights file (.pth/.safetensors); None = random init
        "drop_rate": 0.0,
    },
    "stages": {
        "state_params": {
            "main_metric": "accuracy03",
            "minimize_metric": False,
            "accumulation_steps": 2,
        },
        "criterion_params": {
            "criterion": "LabelSmoothingCrossEntropy",
            "smoothing": 0.1,
        },
        "data_params": {
            "batch_size": 64,
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
            "augment": True,
            "channel_dropout": 0.0,
            # control: hold out the controls of valid_csv's experiments (see train/data.py)
            "control_holdout": True,
        },
        "stage0": {
            "state_params": {"num_epochs": 2},
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
}
STAGE_DEFAULTS = {
    "state_params": {"num_epochs": 1},
    "freeze_backbone": False,
    "optimizer_params": {"optimizer": "Nadam", "lr": 1e-4, "weight_decay": 0.0},
    "scheduler_params": {"scheduler": "none"},
}


class ConfigError(BadInput):
    """A config that cannot run; the message names the key and what is wrong."""


class Config:
    """Read-only attribute view of a resolved config dict (`cfg.stages.data_params.batch_size`)."""

    __slots__ = ("_d",)

    def __init__(self, d: Mapping[str, Any]):
        object.__setattr__(self, "_d", d)

    def __getattr__(self, key):
        try:
            v = self._d[key]
        except KeyError:
            raise AttributeError(f"config has no key {key!r} (keys: {sorted(self._d)})") from None
        return Config(v) if isinstance(v, Mapping) else copy.deepcopy(v)

    def __getitem__(self, key):
        return self.__getattr__(key)

    def __setattr__(self, key, value):
        raise AttributeError("Config is read-only; change the YAML or pass an override")

    def __contains__(self, key):
        return key in self._d

    def keys(self):
        return self._d.keys()

    def to_dict(self) -> dict:
        return copy.deepcopy(dict(self._d))

    def __repr__(self):
        return f"{type(self).__name__}({self._d!r})"


class RunConfig(Config):
    """The top level of a resolved config, plus the facts derived from it."""

    __slots__ = ()

    # Derived facts every module needs; computed here so they agree.  Only on
    # the top level, so a section's own key (data_params.channels) is never shadowed.
    @property
    def part(self) -> str:
        return self._d["part"]

    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(self._d["stages"]["data_params"]["channels"])

    @property
    def stage_names(self) -> list[str]:
        return stage_names(self._d)

    @property
    def run_dir(self) -> str:
        return run_dir(self._d)


# ---------------------------------------------------------------- loading

def read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist")
    with open(path) as f:
        try:
            d = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(d).__name__}")
    return d


def deep_merge(base: dict, top: Mapping) -> dict:
    """`top` over `base`, recursively for mappings; lists and scalars replace."""
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def dotted_to_nested(overrides: Mapping[str, Any]) -> dict:
    """{'stages.data_params.batch_size': 8} -> {'stages': {'data_params': {'batch_size': 8}}}."""
    nested: dict = {}
    for key, value in overrides.items():
        parts = [p for p in str(key).split(".") if p]
        if not parts:
            raise ConfigError(f"empty override key {key!r}")
        node = nested
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r} conflicts with another override")
        node[parts[-1]] = _cli_scalar(value)
    return nested


def _cli_scalar(value):
    # fire passes `--x=true` as the string 'true'; YAML spelling is what a config user types.
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "null", "~"):
        return {"true": True, "false": False}.get(value.strip().lower())
    return value


def load_config(part: str, config: str | None = None, *, overrides: str | list | None = None,
                channels=None, fold=None, model_name=None, logdir=None, shards=None,
                dotted: Mapping[str, Any] | None = None) -> Config:
    """Resolve one run's config.

    Layers, later wins: built-in defaults, `config` (YAML), `overrides`
    (one or more YAML files merged on top, e.g. configs/tiny.yml), `dotted`
    ({'stages.data_params.batch_size': 8}), then the CLI shortcuts
    (channels, fold, model_name, logdir, shards).  `channels` also sets
    `model_params.n_channels` unless that is given explicitly.
    """
    if part not in PARTS:
        raise ConfigError(f"unknown part {part!r}; expected one of {list(PARTS)}")
    user: dict = {}
    sources = []
    if config:
        user = deep_merge(user, _checked_top(read_yaml(config), config))
        sources.append(config)
    if overrides:
        for path in [overrides] if isinstance(overrides, str) else list(overrides):
            user = deep_merge(user, _checked_top(read_yaml(path), path))
            sources.append(path)
    if dotted:
        user = deep_merge(user, _checked_top(dotted_to_nested(dotted), "overrides"))
        sources.append("command-line overrides")
    short: dict = {}
    if channels is not None:
        ch = _parse_channels(channels, "--channels")
        short.setdefault("stages", {}).setdefault("data_params", {})["channels"] = list(ch)
        if "n_channels" not in (dotted_to_nested(dotted or {}).get("model_params") or {}):
            short.setdefault("model_params", {})["n_channels"] = len(ch)
    if fold is not None:
        short.setdefault("args", {})["fold"] = fold
    if model_name is not None:
        short.setdefault("model_params", {})["model_name"] = str(model_name)
    if logdir is not None:
        short.setdefault("args", {})["logdir"] = str(logdir)
    if shards is not None:
        short.setdefault("stages", {}).setdefault("data_params", {})["shards"] = str(shards)
    user = deep_merge(user, short)
    where = " + ".join(sources) or "defaults"
    return RunConfig(resolve(part, user, where))


def _checked_top(d: dict, where: str) -> dict:
    allowed = set(DEFAULTS) | {"part"}
    bad = sorted(set(d) - allowed)
    if bad:
        raise ConfigError(f"{where}: unknown section(s) {bad}; valid sections: {sorted(allowed)}")
    return d


# ---------------------------------------------------------------- validation

def resolve(part: str, user: Mapping, where: str = "config") -> dict:
    """Merge `user` onto the defaults, reject unknown keys, check values, expand templates."""
    user = dict(user)
    if "part" in user and user["part"] != part:
        raise ConfigError(f"{where}: part is {user['part']!r} but the command is {part!r}")
    user.pop("part", None)
    user_stages = dict(user.get("stages") or {})
    # Stages given by the user replace the default stage list, so a config can
    # define one stage or three; shared sections merge key by key.
    given_stage_names = [k for k in user_stages if _STAGE_NAME.match(str(k))]
    defaults = copy.deepcopy(DEFAULTS)
    if given_stage_names:
        for name in list(defaults["stages"]):
            if _STAGE_NAME.match(name) and name not in given_stage_names:
                del defaults["stages"][name]
    cfg = _merge_checked(defaults, user, "", where)
    cfg["part"] = part
    _validate(cfg, part, where)
    _expand(cfg)
    return cfg


def _merge_checked(base: dict, top: Mapping, prefix: str, where: str) -> dict:
    out = copy.deepcopy(base)
    for k, v in top.items():
        key = f"{prefix}{k}"
        if prefix == "stages." and _STAGE_NAME.match(str(k)):
            stage_base = out.get(k) or copy.deepcopy(STAGE_DEFAULTS)
            if v is None:
                v = {}
            if not isinstance(v, Mapping):
                raise ConfigError(f"{where}: {key} must be a mapping")
            out[k] = _merge_stage(stage_base, v, key, where)
            continue
        if k not in out:
            valid = sorted(out) + (["stage0", "stage1", "..."] if prefix == "stages." else [])
            raise ConfigError(f"{where}: unknown key {key!r}; valid keys under "
                              f"{prefix.rstrip('.') or 'the top level'}: {valid}")
        if isinstance(out[k], dict):
            if not isinstance(v, Mapping):
                raise ConfigError(f"{where}: {key} must be a mapping of keys {sorted(out[k])}")
            out[k] = _merge_checked(out[k], v, key + ".", where)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _merge_stage(base: dict, top: Mapping, prefix: str, where: str) -> dict:
    out = copy.deepcopy(base)
    for k, v in top.items():
        key = f"{prefix}.{k}"
        if k not in STAGE_DEFAULTS:
            raise ConfigError(f"{where}: unknown key {key!r}; valid keys under {prefix}: "
                              f"{sorted(STAGE_DEFAULTS)}")
        if k == "scheduler_params":
            if not isinstance(v, Mapping):
                raise ConfigError(f"{where}: {key} must be a mapping")
            name = v.get("scheduler", out["scheduler_params"].get("scheduler"))
            if name not in SCHEDULERS:
                raise ConfigError(f"{where}: {key}.scheduler {name!r} unknown; "
                                  f"valid: {sorted(SCHEDULERS)}")
            keep = out["scheduler_params"] if name == out["scheduler_params"].get("scheduler") else {}
            merged = {"scheduler": name, **copy.deepcopy(SCHEDULERS[name])}
            merged.update({kk: vv for kk, vv in keep.items() if kk in merged})
            for kk, vv in v.items():
                if kk not in merged:
                    raise ConfigError(f"{where}: unknown key '{key}.{kk}' for {name}; valid keys: "
                                      f"{sorted(merged)}")
                merged[kk] = copy.deepcopy(vv)
            out[k] = merged
        elif isinstance(out[k], dict):
            if not isinstance(v, Mapping):
                raise ConfigError(f"{where}: {key} must be a mapping of keys {sorted(out[k])}")
            for kk, vv in v.items():
                if kk not in out[k]:
                    raise ConfigError(f"{where}: unknown key '{key}.{kk}'; valid keys under "
                                      f"{key}: {sorted(out[k])}")
                out[k][kk] = copy.deepcopy(vv)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _parse_channels(value, key):
    try:
        return parse_channels(value)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None


def _check(cond, where, msg):
    if not cond:
        raise ConfigError(f"{where}: {msg}")


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _validate(cfg: dict, part: str, where: str) -> None:
    a, m, s = cfg["args"], cfg["model_params"], cfg["stages"]
    dp, sp, cp = s["data_params"], s["state_params"], s["criterion_params"]

    ch = _parse_channels(dp["channels"], f"{where}: stages.data_params.channels")
    dp["channels"] = list(ch)
    _check(_is_int(m["n_channels"]) and m["n_channels"] == len(ch), where,
           f"model_params.n_channels is {m['n_channels']!r} but stages.data_params.channels "
           f"{list(ch)} has {len(ch)} channels; they must agree")

    _check(m["model"] in MODELS, where,
           f"model_params.model {m['model']!r} unknown; valid: {list(MODELS)}")
    _check(isinstance(m["model_name"], str) and m["model_name"], where,
           "model_params.model_name must be a timm model name, e.g. se_resnext50_32x4d")
    want = NUM_CLASSES_OF_PART[part]
    _check(m["num_classes"] == want, where,
           f"model_params.num_classes is {m['num_classes']!r}; part {part!r} trains {want} classes")
    _check(m["pretrained"] is None or isinstance(m["pretrained"], str), where,
           "model_params.pretrained must be a path to a local weights file or null")
    _check(_is_num(m["drop_rate"]) and 0 <= m["drop_rate"] < 1, where,
           "model_params.drop_rate must be in [0, 1)")

    fold = a["fold"]
    _check(_is_int(fold) and fold >= 0, where, f"args.fold must be an integer >= 0, got {fold!r}")
    _check(_is_int(a["seed"]), where, "args.seed must be an integer")
    _check(a["amp"] in AMP_MODES, where, f"args.amp {a['amp']!r} unknown; valid: {list(AMP_MODES)}")
    _check(a["channels_last"] in ("auto", True, False), where,
           "args.channels_last must be auto, true or false")
    _check(isinstance(a["device"], str) and re.match(r"^(auto|cpu|cuda(:\d+)?)$", a["device"]),
           where, f"args.device {a['device']!r} must be auto, cpu, cuda or cuda:N")
    for k in ("deterministic", "progress"):
        _check(isinstance(a[k], bool), where, f"args.{k} must be true or false")

    _check(sp["main_metric"] in METRICS, where,
           f"stages.state_params.main_metric {sp['main_metric']!r} unknown; valid: {list(METRICS)}")
    _check(isinstance(sp["minimize_metric"], bool), where,
           "stages.state_params.minimize_metric must be true or false")
    _check(_is_int(sp["accumulation_steps"]) and sp["accumulation_steps"] >= 1, where,
           "stages.state_params.accumulation_steps must be an integer >= 1")
    _check(cp["criterion"] in CRITERIA, where,
           f"stages.criterion_params.criterion {cp['criterion']!r} unknown; valid: {list(CRITERIA)}")
    _check(_is_num(cp["smoothing"]) and 0 <= cp["smoothing"] < 1, where,
           "stages.criterion_params.smoothing must be in [0, 1)")

    for k in ("batch_size", "num_workers", "image_size"):
        lo = 0 if k == "num_workers" else 1
        _check(_is_int(dp[k]) and dp[k] >= lo, where,
               f"stages.data_params.{k} must be an integer >= {lo}, got {dp[k]!r}")
    _check(dp["valid_batch_size"] is None or (_is_int(dp["valid_batch_size"])
                                              and dp["valid_batch_size"] >= 1), where,
           "stages.data_params.valid_batch_size must be null or an integer >= 1")
    _check(dp["dataset"] == DATASET_OF_PART[part], where,
           f"stages.data_params.dataset is {dp['dataset']!r}, which is not the {part!r} part "
           f"(expected {DATASET_OF_PART[part]!r}); is this the right config file?")
    if isinstance(dp["sites"], list):  # the reference's form: [1] one site, [1, 2] both
        ref = sorted(dp["sites"])
        _check(ref in ([1], [2], [1, 2]), where,
               f"stages.data_params.sites {dp['sites']!r}: a list must be [1], [2] or [1, 2]")
        dp["sites"], dp["site"] = ("two", 1) if ref == [1, 2] else ("one", ref[0])
    _check(dp["sites"] in SITE_MODES, where,
           f"stages.data_params.sites {dp['sites']!r} unknown; valid: {list(SITE_MODES)}")
    _check(dp["site"] in (1, 2), where, "stages.data_params.site must be 1 or 2")
    _check(dp["norm"] in NORM_MODES, where,
           f"stages.data_params.norm {dp['norm']!r} unknown; valid: {list(NORM_MODES)}")
    _check(dp["backend"] in BACKENDS, where,
           f"stages.data_params.backend {dp['backend']!r} unknown; valid: {list(BACKENDS)}")
    for k in ("drop_last", "augment", "control_holdout"):
        _check(isinstance(dp[k], bool), where, f"stages.data_params.{k} must be true or false")
    _check(_is_num(dp["channel_dropout"]) and 0 <= dp["channel_dropout"] < 1, where,
           "stages.data_params.channel_dropout must be in [0, 1)")
    for k in ("shards", "train_csv", "valid_csv"):
        _check(isinstance(dp[k], str) and dp[k], where, f"stages.data_params.{k} must be a path")

    names = stage_names(cfg)
    _check(names, where, "stages must define at least one stage (stage0, stage1, ...)")
    for name in names:
        st = s[name]
        key = f"stages.{name}"
        ep = st["state_params"]["num_epochs"]
        _check(_is_int(ep) and ep >= 0, where, f"{key}.state_params.num_epochs must be an integer >= 0")
        _check(isinstance(st["freeze_backbone"], bool), where,
               f"{key}.freeze_backbone must be true or false")
        op = st["optimizer_params"]
        _check(op["optimizer"] in OPTIMIZERS, where,
               f"{key}.optimizer_params.optimizer {op['optimizer']!r} unknown; valid: {list(OPTIMIZERS)}")
        _check(_is_num(op["lr"]) and op["lr"] > 0, where,
               f"{key}.optimizer_params.lr must be > 0, got {op['lr']!r}")
        _check(_is_num(op["weight_decay"]) and op["weight_decay"] >= 0, where,
               f"{key}.optimizer_params.weight_decay must be >= 0")
        sch = st["scheduler_params"]
        if sch["scheduler"] == "MultiStepLR":
            _check(isinstance(sch["milestones"], list) and all(_is_int(x) and x >= 0
                                                               for x in sch["milestones"]),
                   where, f"{key}.scheduler_params.milestones must be a list of epochs")
            _check(_is_num(sch["gamma"]) and sch["gamma"] > 0, where,
                   f"{key}.scheduler_params.gamma must be > 0")
        elif sch["scheduler"] == "OneCycleLR":
            _check(_is_int(sch["num_steps"]) and sch["num_steps"] >= 1, where,
                   f"{key}.scheduler_params.num_steps (epochs of the cycle) must be an integer >= 1")
            _check(_is_int(sch["warmup_steps"]) and 0 <= sch["warmup_steps"] < max(sch["num_steps"], 1),
                   where, f"{key}.scheduler_params.warmup_steps must be an integer in [0, num_steps)")
            for rk in ("lr_range", "momentum_range"):
                r = sch[rk]
                _check(isinstance(r, list) and len(r) == 2 and all(_is_num(x) for x in r), where,
                       f"{key}.scheduler_params.{rk} must be a list of two numbers")
            _check(all(x > 0 for x in sch["lr_range"]), where,
                   f"{key}.scheduler_params.lr_range values must be > 0")
            _check(all(0 <= x < 1 for x in sch["momentum_range"]), where,
                   f"{key}.scheduler_params.momentum_range values must be in [0, 1)")
    _check(sum(s[n]["state_params"]["num_epochs"] for n in names) >= 1, where,
           "the stages train for 0 epochs in total")


def stage_names(cfg: Mapping) -> list[str]:
    names = [k for k in cfg["stages"] if _STAGE_NAME.match(str(k))]
    return sorted(names, key=lambda n: int(n[5:]))


def _expand(cfg: dict) -> None:
    """Fill the path templates ({fold}, {shards}, {logdir}, {channels}, {model_name})."""
    dp, a = cfg["stages"]["data_params"], cfg["args"]
    keys = {"fold": a["fold"], "shards": dp["shards"].rstrip("/"), "logdir": a["logdir"].rstrip("/"),
            "channels": channels_dirname(dp["channels"]),
            "model_name": cfg["model_params"]["model_name"], "part": cfg["part"]}
    for section, k in (("dp", "train_csv"), ("dp", "valid_csv"), ("a", "pretrained_control")):
        d = dp if section == "dp" else a
        try:
            d[k] = str(d[k]).format(**keys)
        except (KeyError, IndexError) as e:
            raise ConfigError(f"{k} {d[k]!r}: unknown template field {e}; "
                              f"available: {sorted(keys)}") from None


def run_dir(cfg: Mapping) -> str:
    """LOGS/<part>/[1,2,3,4,5]/fold_<k>/<model_name> (control has no fold level)."""
    parts = [cfg["args"]["logdir"], cfg["part"], channels_dirname(cfg["stages"]["data_params"]["channels"])]
    if cfg["part"] != "control":
        parts.append(f"fold_{cfg['args']['fold']}")
    parts.append(cfg["model_params"]["model_name"])
    return os.path.join(*parts)


def dump_yaml(cfg: Config | Mapping, path: str) -> None:
    d = cfg.to_dict() if isinstance(cfg, Config) else dict(cfg)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        yaml.safe_dump(d, f, sort_keys=False, default_flow_style=None)
    os.replace(tmp, path)
