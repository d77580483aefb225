"""Each layer of a config (one YAML file, or the command-line keys) checked on its own
against the defaults' shapes and types, naming that layer, before the layers merge.

Checked alone because the merge would hide it: a file saying `stages: 5`
followed by one with a `stages:` mapping lost every key of the first without a
word.  The rule is the defaults' own type (a mapping stays a mapping, a bool a
bool, an int an int, a float any number, a str a str, a list a list; a null
default takes anything), so new keys in config_schema are covered as they come.
The valid *values* are config_check's, on the merged config.
"""
from __future__ import annotations

from typing import Any, Mapping

from train.config_schema import DEFAULTS, SCHEDULERS, STAGE_DEFAULTS, STAGE_NAME, ConfigError

# Keys that take a second type besides their default's (config_check reads both).
ALSO_TAKES: dict[str, tuple] = {
    "args.channels_last": (bool,),                # auto | true | false
    "model_params.pretrained": (type(None),),     # null = none
    "stages.data_params.sites": (list,),          # the reference's [1, 2]
    "stages.data_params.channels": (str,),        # "[1,2,3,4,5]"
}
_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "text",
          list: "a list"}
# Every scheduler's keys: which of them a stage may use depends on its scheduler, which
# the merge checks; here only their types.
_SCHEDULER_KEYS = {"scheduler": "", **{k: v for s in SCHEDULERS.values() for k, v in s.items()}}


def check_layer(layer: Mapping, where: str) -> None:
    """ConfigError naming `where` and the dotted key of the first value of the wrong shape."""
    _walk(layer, {**DEFAULTS, "part": ""}, "", where)


def _walk(layer: Mapping, ref: Mapping, prefix: str, where: str) -> None:
    for k, v in layer.items():
        key = f"{prefix}{k}"
        if prefix == "stages." and STAGE_NAME.match(str(k)):
            if v is not None:        # null removes a default stage
                _walk(_mapping(v, key, STAGE_DEFAULTS, where), STAGE_DEFAULTS, key + ".", where)
            continue
        if k not in ref:
            valid = sorted(ref) + (["stage0", "stage1", "..."] if prefix == "stages." else [])
            raise ConfigError(f"{where}: unknown key {key!r}; valid keys under "
                              f"{prefix.rstrip('.') or 'the top level'}: {valid}")
        if k == "scheduler_params":
            _walk(_mapping(v, key, _SCHEDULER_KEYS, where), _SCHEDULER_KEYS, key + ".", where)
        elif isinstance(ref[k], dict):
            _walk(_mapping(v, key, ref[k], where), ref[k], key + ".", where)
        else:
            _leaf(v, ref[k], key, where)


def _mapping(v: Any, key: str, ref: Mapping, where: str) -> Mapping:
    if not isinstance(v, Mapping):
        raise ConfigError(f"{where}: {key} must be a mapping of keys {sorted(ref)}, "
                          f"got {v!r}")
    return v


def _leaf(v: Any, default: Any, key: str, where: str) -> None:
    if default is None or isinstance(v, ALSO_TAKES.get(key, ())):
        return
    t = type(default)
    ok = {bool: lambda: isinstance(v, bool),
          int: lambda: isinstance(v, int) and not isinstance(v, bool),
          float: lambda: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda: isinstance(v, str),
          list: lambda: isinstance(v, list)}.get(t, lambda: True)()
    if not ok:
        hint = ""
        if isinstance(v, str) and t in (int, float) and _is_number_text(v):
            hint = f" (YAML reads {v} as text: write it with a dot, e.g. 1.0e-4)"
        raise ConfigError(f"{where}: {key} must be {_WORDS[t]}, got {v!r}{hint}")


def _is_number_text(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False
