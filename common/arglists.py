"""The one parser of the list-valued command-line options: channel subsets and folds.

fire turns `--channels "[1,2,3,4,5]"` into a list, `--folds 0,1` into a tuple
and `--folds 0` into an int; a Makefile passes `"[1,2,3,4,5];[1,2,3,5,6]"`.
Every CLI (train, infer, demo, bench) reads these options through here, so
each spelling means the same thing everywhere.
"""
from __future__ import annotations

import ast

from common.errors import BadInput
from shards.layout import FIVE_CHANNEL_SUBSETS, parse_channels

ALL = "all"


def parse_subsets(value, option: str = "--channels") -> list[tuple[int, ...]]:
    """Channel subsets, 1-based: 'all' (the six five-channel subsets), one subset
    ('[1,2,3,4,5]' or [1,2,3,4,5]), or several ('[1,2,3,4,5];[1,2,3,5,6]',
    [[1,2,3,4,5],[1,2,3,5,6]]). BadInput names the option and the bad subset."""
    if isinstance(value, str):
        text = value.strip()
        if text.lower() == ALL:
            return [tuple(c) for c in FIVE_CHANNEL_SUBSETS]
        if ";" in text:
            value = [p for p in text.split(";") if p.strip()]
        else:
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                raise BadInput(f"{option} {value!r}: not a channel list like [1,2,3,5,6], "
                               "several separated by ';', or 'all'") from None
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(v, (list, tuple, str)) for v in value):
        parts = list(value)
    else:
        parts = [value]
    out = []
    for p in parts:
        try:
            sub = parse_channels(p)
        except ValueError as e:
            raise BadInput(f"{option}: {e}") from None
        if sub not in out:
            out.append(sub)
    if not out:
        raise BadInput(f"{option}: no channel subset given; e.g. [1,2,3,5,6] or 'all'")
    return out


def parse_folds(value, n_folds: int | None = None, option: str = "--folds") -> list[int]:
    """Fold numbers: 'all' (0..n_folds-1), 0, '0,1', (0, 1), [0, 1].

    BadInput for a negative or non-integer fold, or one >= n_folds when given."""
    if isinstance(value, str) and value.strip().lower() == ALL:
        if n_folds is None:
            raise BadInput(f"{option} all: the number of folds is not known here; list them, e.g. 0,1")
        return list(range(int(n_folds)))
    if isinstance(value, str):
        items = [v for v in value.strip().strip("[]()").split(",") if v.strip()]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [value]
    out = []
    for v in items:
        if isinstance(v, bool):
            raise BadInput(f"{option}: {v!r} is not a fold number")
        try:
            f = int(str(v).strip()) if not isinstance(v, int) else v
        except ValueError:
            raise BadInput(f"{option}: {v!r} is not a fold number (integers >= 0, or 'all')") from None
        if f < 0 or (n_folds is not None and f >= n_folds):
            limit = f" < {n_folds}" if n_folds is not None else ""
            raise BadInput(f"{option}: fold {f} out of range (need 0 <= fold{limit})")
        if f not in out:
            out.append(f)
    if not out:
        raise BadInput(f"{option}: no fold given; e.g. 0,1 or 'all'")
    return out


def parse_names(value, option: str = "--model-names") -> list[str] | None:
    """'a,b' / ('a', 'b') / None -> list of names (None when not given)."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, (list, tuple)):
        items = [str(v) for v in value]
    else:
        items = [str(value)]
    out = [v.strip() for v in items if v.strip()]
    if not out:
        raise BadInput(f"{option}: empty list of names")
    return out
