"""Reading the layers of a config: YAML files, dotted command-line keys, and merging them
onto the defaults with every unknown key rejected (naming the valid ones)."""
from __future__ import annotations

import copy
import os
from typing import Any, Mapping

import yaml

from train.config_schema import DEFAULTS, SCHEDULERS, STAGE_DEFAULTS, STAGE_NAME, ConfigError
from train.config_shape import check_layer

# The project root (the package's parent): `configs/<part>.yml` means the project's
# configs wherever the command runs from.
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def project_path(path: str) -> str:
    """`path` as given when it exists from the working directory, else relative to the
    project root when it exists there; unchanged otherwise (the reader names it)."""
    path = os.fspath(path)
    if os.path.exists(path) or os.path.isabs(path):
        return path
    inside = os.path.join(PROJECT_ROOT, path)
    return inside if os.path.exists(inside) else path


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"{self.name}: key {key!r} given twice in one mapping "
                                  f"(lines {seen[key]} and {line}); keep one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str) -> dict:
    if os.path.isdir(path):
        raise ConfigError(f"config file {path} is a directory; give a YAML file, e.g. "
                          "configs/finetune.yml")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist")
    with open(path) as f:
        try:
            d = yaml.load(f, Loader=_UniqueKeyLoader)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(d).__name__}")
    return checked_top(d, path)


def checked_top(d: dict, where: str) -> dict:
    allowed = set(DEFAULTS) | {"part"}
    bad = sorted(set(d) - allowed)
    if bad:
        raise ConfigError(f"{where}: unknown section(s) {bad}; valid sections: {sorted(allowed)}")
    check_layer(d, where)
    return d


def deep_merge(base: dict, top: Mapping) -> dict:
    """`top` over `base`, recursively for mappings; lists and scalars replace."""
    out = copy.deepcopy(base)
    for k, v in top.items():
        if k == "scheduler_params" and isinstance(v, Mapping) and isinstance(out.get(k), dict) \
                and v.get("scheduler", out[k].get("scheduler")) != out[k].get("scheduler"):
            out[k] = copy.deepcopy(dict(v))   # another scheduler: the old one's keys go
        elif isinstance(v, Mapping) and isinstance(out.get(k), dict):
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
    return checked_top(nested, "command-line overrides")


def _cli_scalar(value):
    # fire passes `--x=true` as the string 'true'; YAML spelling is what a config user types.
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "null", "~"):
        return {"true": True, "false": False}.get(value.strip().lower())
    return value


def merge_onto_defaults(user: Mapping, where: str) -> dict:
    """The defaults with `user` merged on top, key by key.  A stage the user names
    merges onto the default stage of that name (or onto STAGE_DEFAULTS for a new
    one, e.g. stage2); `stageN: null` removes a default stage."""
    user = copy.deepcopy(dict(user))
    defaults = copy.deepcopy(DEFAULTS)
    stages = user.get("stages")
    if isinstance(stages, Mapping):
        for name in [k for k, v in stages.items() if STAGE_NAME.match(str(k)) and v is None]:
            defaults["stages"].pop(name, None)
            del stages[name]
    return _merge_checked(defaults, user, "", where)


def _merge_checked(base: dict, top: Mapping, prefix: str, where: str) -> dict:
    out = copy.deepcopy(base)
    for k, v in top.items():
        key = f"{prefix}{k}"
        if prefix == "stages." and STAGE_NAME.match(str(k)):
            if not isinstance(v, Mapping):
                raise ConfigError(f"{where}: {key} must be a mapping (or null to remove it)")
            out[k] = _merge_stage(out.get(k) or copy.deepcopy(STAGE_DEFAULTS), v, key, where)
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
            out[k] = _merge_scheduler(out[k], v, key, where)
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


def _merge_scheduler(base: dict, top, key: str, where: str) -> dict:
    """A scheduler's keys depend on the scheduler: switching it drops the old one's keys."""
    if not isinstance(top, Mapping):
        raise ConfigError(f"{where}: {key} must be a mapping")
    name = top.get("scheduler", base.get("scheduler"))
    if name not in SCHEDULERS:
        raise ConfigError(f"{where}: {key}.scheduler {name!r} unknown; valid: {sorted(SCHEDULERS)}")
    keep = base if name == base.get("scheduler") else {}
    merged = {"scheduler": name, **copy.deepcopy(SCHEDULERS[name])}
    merged.update({kk: vv for kk, vv in keep.items() if kk in merged})
    for kk, vv in top.items():
        if kk not in merged:
            raise ConfigError(f"{where}: unknown key '{key}.{kk}' for {name}; valid keys: "
                              f"{sorted(merged)}")
        merged[kk] = copy.deepcopy(vv)
    return merged
