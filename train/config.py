"""One training run's configuration: YAML + overrides, checked once, then read-only.

`load_config(part, ...)` is the only entry point; it returns a `RunConfig`, a
read-only view with attribute access over the resolved nested dict.  The
schema and defaults live in train/config_schema.py, the reading and merging
in train/config_load.py, the checks in train/config_check.py.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

import yaml

from common import run_layout
from shards.atomic import write_bytes
from train.config_check import parse_channels_key, validate
from train.config_load import (deep_merge, dotted_to_nested, merge_onto_defaults, project_path,
                               read_yaml)
from train.config_schema import (DEFAULTS, HARMLESS_KEYS, LABEL_OFFSET_OF_PART, PARTS,
                                 ConfigError, stage_names)

__all__ = ["load_config", "Config", "RunConfig", "ConfigError", "DEFAULTS",
           "LABEL_OFFSET_OF_PART", "dump_yaml", "changed_keys"]


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

    # Only on the top level, so a section's own key (data_params.channels) is never shadowed.
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
    def starts_from_control(self) -> bool:
        """Parts II/III start from the control model unless args.pretrained_control is
        none (the 1st place's single run: from model_params.pretrained, no Part I)."""
        return self._d["args"]["pretrained_control"] is not None

    @property
    def run_dir(self) -> str:
        d = self._d
        return run_layout.run_dir(d["args"]["logdir"], d["part"], self.channels,
                                  d["args"]["fold"], d["model_params"]["model_name"])


def load_config(part: str, config: str | None = None, *, overrides: str | list | None = None,
                channels=None, fold=None, model_name=None, logdir=None, shards=None,
                dotted: Mapping[str, Any] | None = None) -> RunConfig:
    """Resolve one run's config.

    Layers, later wins: built-in defaults, `config` (YAML), `overrides`
    (one or more YAML files merged on top in order, e.g. configs/tiny.yml or
    "configs/tiny.yml,configs/plus.yml"), `dotted`
    ({'stages.data_params.batch_size': 8}), then the CLI shortcuts
    (channels, fold, model_name, logdir, shards).  `channels` also sets
    `model_params.n_channels` unless that is given explicitly.  Config paths
    that do not exist from the working directory are read from the project.
    """
    if part not in PARTS:
        raise ConfigError(f"unknown part {part!r}; expected one of {list(PARTS)}")
    user: dict = {}
    sources = []
    paths = ([config] if config else []) + override_paths(overrides)
    for path in paths:
        path = project_path(path)
        user = deep_merge(user, read_yaml(path))
        sources.append(path)
    nested = dotted_to_nested(dotted or {})
    if nested:
        user = deep_merge(user, nested)
        sources.append("command-line overrides")
    user = deep_merge(user, _shortcuts(channels, fold, model_name, logdir, shards, nested))
    return RunConfig(resolve(part, user, " + ".join(sources) or "defaults"))


def override_paths(overrides) -> list[str]:
    """`--overrides`: one YAML path, several separated by commas (later wins), or a list."""
    if overrides is None:
        return []
    items = overrides.split(",") if isinstance(overrides, str) else list(overrides)
    return [str(p).strip() for p in items if str(p).strip()]


def _shortcuts(channels, fold, model_name, logdir, shards, nested) -> dict:
    short: dict = {}
    if channels is not None:
        ch = parse_channels_key(channels, "--channels")
        short.setdefault("stages", {}).setdefault("data_params", {})["channels"] = list(ch)
        if "n_channels" not in (nested.get("model_params") or {}):
            short.setdefault("model_params", {})["n_channels"] = len(ch)
    if fold is not None:
        short.setdefault("args", {})["fold"] = fold
    if model_name is not None:
        short.setdefault("model_params", {})["model_name"] = str(model_name)
    if logdir is not None:
        short.setdefault("args", {})["logdir"] = str(logdir)
    if shards is not None:
        short.setdefault("stages", {}).setdefault("data_params", {})["shards"] = str(shards)
    return short


def resolve(part: str, user: Mapping, where: str = "config") -> dict:
    """Merge `user` onto the defaults, reject unknown keys, check values, expand templates."""
    user = dict(user)
    if "part" in user and user["part"] != part:
        raise ConfigError(f"{where}: part is {user['part']!r} but the command is {part!r}")
    user.pop("part", None)
    cfg = merge_onto_defaults(user, where)
    cfg["part"] = part
    validate(cfg, part, where)
    _expand(cfg)
    return cfg


def _expand(cfg: dict) -> None:
    """Fill the path templates ({fold}, {shards}, {logdir}, {channels}, {model_name}, {part})."""
    dp, a = cfg["stages"]["data_params"], cfg["args"]
    keys = {"fold": a["fold"], "shards": dp["shards"].rstrip("/"), "logdir": a["logdir"].rstrip("/"),
            "channels": run_layout.channels_dirname(dp["channels"]),
            "model_name": cfg["model_params"]["model_name"], "part": cfg["part"]}
    if str(a["pretrained_control"]).lower() in ("none", "null"):
        a["pretrained_control"] = None
    for d, k in ((dp, "train_csv"), (dp, "valid_csv"), (a, "pretrained_control")):
        if d[k] is None:
            continue
        try:
            d[k] = str(d[k]).format(**keys)
        except (KeyError, IndexError) as e:
            raise ConfigError(f"{k} {d[k]!r}: unknown template field {e}; "
                              f"available: {sorted(keys)}") from None


def changed_keys(saved: Mapping, now: Mapping) -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, value now) for every key that differs and matters:
    everything but HARMLESS_KEYS (where and how a run executes, not what it trains)."""
    a, b = _flat(saved), _flat(now)
    # A key added to the schema after a run was saved reads as its default there: the
    # default of every new key (e.g. the plus recipe's) trains as before it existed.
    known = _flat(DEFAULTS)
    out = []
    for key in sorted(set(a) | set(b)):
        was, is_ = a.get(key, known.get(key, "<absent>")), b.get(key, known.get(key, "<absent>"))
        if key in HARMLESS_KEYS or was == is_:
            continue
        out.append((key, was, is_))
    return out


def _flat(d: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def dump_yaml(cfg: Config | Mapping, path: str) -> None:
    d = cfg.to_dict() if isinstance(cfg, Config) else dict(cfg)
    write_bytes(path, yaml.safe_dump(d, sort_keys=False, default_flow_style=None))
