"""`python -m prep preview OUT --id-code ID --site 1 --out site.png`: one site as an RGB composite.

The colours and contrast ranges are the customary RxRx1 ones (rxrx1-utils'
`convert_tensor_to_rgb`): each channel is stretched so that its range maps to
0..1 (clipped), tinted with its colour, and the six tints are summed and
clipped to 255.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from common.errors import refuse_to_replace
from shards.atomic import write_atomic
from shards.layout import CHANNELS, SITES
from shards.store import StoreError, open_store

# channel -> (RGB colour, gray-level range stretched to full intensity)
RGB_MAP = {
    1: ((19, 0, 249), (0, 51)),      # blue
    2: ((42, 255, 31), (0, 107)),    # green
    3: ((255, 0, 25), (0, 64)),      # red
    4: ((45, 255, 252), (0, 191)),   # cyan
    5: ((250, 0, 253), (0, 89)),     # magenta
    6: ((254, 255, 40), (0, 191)),   # yellow
}


def composite(pixels: np.ndarray, channels=CHANNELS) -> np.ndarray:
    """(H, W, len(channels)) uint8 -> (H, W, 3) uint8, as rxrx's convert_tensor_to_rgb."""
    out = np.zeros(pixels.shape[:2] + (3,), np.int64)
    for i, c in enumerate(channels):
        rgb, (lo, hi) = RGB_MAP[c]
        x = (pixels[..., i] / 255.0) / ((hi - lo) / 255.0) + lo / 255.0
        x = np.minimum(x, 1.0)
        # rxrx truncates each channel's tint to int before summing.
        out += (x[..., None] * np.asarray(rgb, np.float64)).astype(np.int64)
    return np.minimum(out, 255).astype(np.uint8)


def preview(out_dir, id_code, site=1, out="site.png", overwrite=False):
    """Write the composite of one site (from the zarr store) to `out`; returns its path."""
    ext = os.path.splitext(str(out))[1].lower()
    if ext not in Image.registered_extensions():
        raise StoreError(f"--out {out}: name an image file, e.g. site.png (the extension "
                         "picks the format)")
    folder = os.path.dirname(os.path.abspath(str(out)))
    if not os.path.isdir(folder):
        raise StoreError(f"--out {out}: folder {folder} does not exist")
    if str(site) not in {str(x) for x in SITES}:
        raise StoreError(f"--site {site!r}: sites are {', '.join(map(str, SITES))}")
    if not overwrite:
        refuse_to_replace([out], "--out")   # a mistyped path must not replace a source PNG
    store = open_store(out_dir)
    s = store.sites
    hit = s.index[(s["id_code"] == str(id_code)) & (s["site"] == int(site))]
    if len(hit) == 0:
        known = s["id_code"].iloc[:3].tolist()
        raise StoreError(f"{out_dir}: no site {site} of id_code {id_code!r} in the store "
                         f"(id_codes look like {', '.join(known)}; sites are 1 and 2)")
    row = int(s.loc[hit[0], "row"])
    image = Image.fromarray(composite(store.read_site(row)))
    # PIL picks the format from the extension, so the temporary name keeps it.
    write_atomic(out, lambda tmp: image.save(tmp))
    print(f"{os.path.abspath(out)}: {id_code} site {site} (row {row})")
    return os.path.abspath(out)
