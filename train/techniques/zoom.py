"""The zoom key of a config (stages.data_params.zoom): the loader crops in pixel space,
before normalization, as the 1st place did (shards.loader); this only reads the key."""
from __future__ import annotations

from collections.abc import Mapping

from train.config_schema import ConfigError


def zoom_params(zoom) -> tuple[float, float] | None:
    """stages.data_params.zoom: null/false = off, true = {p: 1, min_side: 0.5} (the 1st
    place's --scale-aug 0.5), or a mapping of those -> (p, min_side)."""
    if zoom is None or zoom is False:
        return None
    where = "stages.data_params.zoom"
    value = {} if zoom is True else zoom
    if not isinstance(value, Mapping) or set(value) - {"p", "min_side"}:
        raise ConfigError(f"{where} {zoom!r}: null/false (off), true or a mapping of "
                          "['min_side', 'p']")
    p, side = value.get("p", 1.0), value.get("min_side", 0.5)
    for k, v in (("p", p), ("min_side", side)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
            raise ConfigError(f"{where}.{k} {v!r}: need a number in [0, 1]")
    if side == 0:
        raise ConfigError(f"{where}.min_side 0: need a share of the side in (0, 1]")
    return float(p), float(side)
