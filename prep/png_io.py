"""Read one site's six channel PNGs, refusing anything that is not 8-bit grayscale of one shape.

Pillow's PNG decoder is the speed limit of prep, so a channel is decoded once,
straight into a numpy array, and checked on the way; every error names the file.
"""
from __future__ import annotations

from common.errors import BadInput

import numpy as np
from PIL import Image

from shards.layout import CHANNELS, png_path
from shards.source_layout import detect_layout


class PngError(BadInput):
    """A source PNG is missing, unreadable, or not the 8-bit grayscale image prep expects."""


def site_paths(data_dir, site_row, source_layout: str | None = None) -> list[str]:
    """The six channel files of one sites-table row (any object with split/experiment/...)
    in `source_layout` (kaggle or release; detected from data_dir's CSVs when None:
    pass it when calling once per site)."""
    r = site_row
    source_layout = source_layout or detect_layout(data_dir)
    return [png_path(data_dir, r["split"], r["experiment"], r["plate"], r["well"], r["site"], c,
                     source_layout) for c in CHANNELS]


def read_channel(path: str) -> np.ndarray:
    """Decode one PNG into a (H, W) uint8 array; PngError naming the file if it is not one."""
    try:
        im = Image.open(path)
    except FileNotFoundError:
        raise PngError(f"{path}: channel file is missing") from None
    except Exception as e:  # PIL raises several types for a file that is not a PNG
        raise PngError(f"{path}: not a readable PNG ({e})") from None
    with im:
        if im.format != "PNG":
            raise PngError(f"{path}: is a {im.format} file, expected PNG")
        # Mode 'L' is exactly 8-bit grayscale; 16-bit decodes as 'I;16'/'I', colour as 'RGB'/'P'.
        if im.mode != "L":
            kind = "16-bit" if im.mode.startswith("I") else f"mode {im.mode}"
            raise PngError(f"{path}: {kind} image, expected 8-bit grayscale (mode L)")
        try:
            im.load()
        except Exception as e:  # truncated data, bad CRC, broken zlib stream
            raise PngError(f"{path}: corrupt or truncated PNG ({e})") from None
        return np.asarray(im)


def read_site(paths: list[str], shape: tuple[int, int] | None = None) -> list[np.ndarray]:
    """Decode the six channels of one site, checking that they share one (H, W) shape,
    and that it is `shape` when given (every site of a store has the first site's shape)."""
    channels = []
    for path in paths:
        ch = read_channel(path)
        want = shape if shape is not None else (channels[0].shape if channels else None)
        if want is not None and ch.shape != tuple(want):
            what = "the store's image size" if shape is not None else f"channel 1 ({paths[0]})"
            raise PngError(f"{path}: image is {ch.shape[1]}x{ch.shape[0]} (WxH), "
                           f"but {what} is {want[1]}x{want[0]}")
        channels.append(ch)
    return channels
