"""Synthetic RxRx1, in either layout (Kaggle or release), with a planted, learnable phenotype signal.

The layout changes only where files go and how the metadata is spelled: the
same seed gives the same wells and the same pixels in both, so the two layouts
of one synthetic set pack into identical stores. ThermoFisher names of the
release layout are made up (`s<20000 + class id>`).

What is planted (README "Synthetic data" has the long form):

* every siRNA has a sparse phenotype vector over 16 cell parameters (density,
  cell size, elongation, nucleus size, Golgi offset, per-channel intensity and
  per-channel texture); most siRNAs move 3 of them, controls move more; the
  negative control moves none;
* families of siRNAs share a phenotype direction (a member's phenotype is 0.8 of
  the family's direction plus 0.6 of its own; the rest stay independent), one member
  per plate group, so the plate constraint still tells them apart; the pairs are
  written as relations.csv, the map benchmark's ground truth (`infer map --relations`);
* every cell type has its own baseline and mixes the phenotype through its own
  response matrix (`0.7 I + 0.3 R`), so a phenotype looks related, not equal,
  across cell types;
* every well adds its own parameter noise (so two wells of one siRNA differ),
  every site a new random field of cells, every cell its own size/brightness;
* every experiment adds a batch effect: per-channel gain (log-normal, sd 0.35)
  and offset and an uneven illumination field; every plate a small gain.
  That is why per-experiment normalization matters;
* pixels get shot and read noise and are quantized to 8 bit.

Cells are rendered as point masses blurred by (anisotropic) Gaussians in the
Fourier domain, one FFT pair per channel, which keeps a 512 px site around
tens of milliseconds. Everything derives from `seed` alone, per site, so the
output does not depend on the number of workers.
"""
from __future__ import annotations

import json
import numbers
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from common.errors import BadInput
from prep.synth_csv import write_csvs, write_relations, write_release_csvs
from shards import layout
from shards.atomic import write_bytes

SYNTH_JSON = "synth.json"  # written last: a whole synth is here (demo and bench test for it)
RUNNING_JSON = "synth-running.json"  # written first: a killed synth's directory is still ours

# Per cell type: experiments in train and in test. `full` is the real count.
PRESETS = {
    "tiny": dict(image_size=64, group_size=3, n_controls=4,
                 train=(2, 2, 1, 1), test=(1, 1, 1, 1), missing=2),
    "demo": dict(image_size=128, group_size=8, n_controls=8,
                 train=(4, 4, 4, 4), test=(2, 2, 2, 2), missing=4),
    "full": dict(image_size=512, group_size=layout.GROUP_SIZE, n_controls=layout.N_CONTROLS,
                 train=(7, 16, 7, 3), test=(4, 8, 4, 2), missing=40),
}

# Phenotype parameters (all on a log or additive scale around the cell type's baseline).
PARAMS = ("density", "cell_size", "elongation", "nucleus_size", "golgi_offset",
          *(f"intensity_w{c}" for c in layout.CHANNELS),
          *(f"texture_w{c}" for c in layout.CHANNELS))
N_PARAMS = len(PARAMS)  # 17

# Difficulty knobs, the same for every preset (documented in the README).
EFFECT_SIZE = 0.45        # phenotype amplitude per moved parameter (log scale)
PARAMS_MOVED = 3          # parameters a treatment siRNA moves
CONTROL_PARAMS_MOVED = 5  # positive controls are stronger, as in real screens
FAMILY_SIZE = 3           # siRNAs sharing a phenotype direction, each from another plate group
FAMILY_SHARE = 0.8        # weight of the shared direction (own: sqrt(1 - 0.8^2) = 0.6)
SIRNAS_PER_FAMILY = 10    # one family per this many treatment siRNAs (at least 2 families)
RELATIONS_CSV = "relations.csv"
WELL_NOISE = 0.12         # per-well parameter noise (log scale)
BATCH_GAIN_SD = 0.35      # per-experiment, per-channel log gain
PLATE_GAIN_SD = 0.05
# Gray levels of one average cell's peak per channel (rings and spots are faint, hence larger).
CHANNEL_SCALE = np.array([70.0, 30.0, 110.0, 160.0, 30.0, 80.0])


@dataclass(frozen=True)
class Experiment:
    name: str
    split: str
    cell_type: str
    index: int            # position in the full experiment list (seeds the batch effect)


def experiment_list(preset: dict) -> list[Experiment]:
    """Experiments in the real naming style: per cell type, train first (-01..), then test."""
    out = []
    for ct_i, ct in enumerate(layout.CELL_TYPES):
        n_train, n_test = preset["train"][ct_i], preset["test"][ct_i]
        for k in range(n_train + n_test):
            split = "train" if k < n_train else "test"
            out.append(Experiment(f"{ct}-{k + 1:02d}", split, ct, len(out)))
    return out


def limit_experiments(exps: list[Experiment], n: int | None) -> list[Experiment]:
    """First n experiments, alternating train and test so both splits appear when n >= 2."""
    if n is None:
        return exps
    train = [e for e in exps if e.split == "train"]
    test = [e for e in exps if e.split == "test"]
    merged = []
    while train or test:
        if train:
            merged.append(train.pop(0))
        if test:
            merged.append(test.pop(0))
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= n <= len(merged):
        raise BadInput(f"--experiments {n!r}: this preset has 1..{len(merged)} experiments")
    return merged[: int(n)]


def design(preset: dict, seed: int) -> dict:
    """Everything that is drawn once per dataset: groups, phenotypes, responses, batch effects."""
    rng = np.random.default_rng([seed, 0])
    n_treat = layout.N_GROUPS * preset["group_size"]
    groups = rng.permutation(n_treat).reshape(layout.N_GROUPS, preset["group_size"])
    n_pos = preset["n_controls"] - 1
    controls = [layout.CONTROL_BASE + i for i in range(n_pos)] + [layout.NEGATIVE_CONTROL]

    phenotype = np.zeros((layout.N_SIRNAS, N_PARAMS), np.float64)
    for s in range(n_treat):
        phenotype[s] = sparse_effect(rng, PARAMS_MOVED)
    for s in controls[:-1]:
        phenotype[s] = sparse_effect(rng, CONTROL_PARAMS_MOVED) * 1.3
    # the negative control stays at zero: cells as the cell type makes them
    families = plant_families(phenotype, groups, seed)

    response = {ct: 0.7 * np.eye(N_PARAMS) + 0.3 * rng.normal(size=(N_PARAMS, N_PARAMS)) / np.sqrt(N_PARAMS)
                for ct in layout.CELL_TYPES}
    baseline = {ct: rng.normal(0, 0.25, N_PARAMS) for ct in layout.CELL_TYPES}
    return dict(groups=groups, controls=controls, phenotype=phenotype,
                response=response, baseline=baseline, n_treat=n_treat, families=families)


def plant_families(phenotype: np.ndarray, groups: np.ndarray, seed: int) -> np.ndarray:
    """(n_families, FAMILY_SIZE) siRNA ids whose phenotypes now share a direction.

    Its own random stream, drawn after the phenotypes: every siRNA outside a family
    keeps the phenotype (and pixels) it had before families existed."""
    rng = np.random.default_rng([seed, 6])
    n_groups, group_size = groups.shape
    n_fam = max(2, groups.size // SIRNAS_PER_FAMILY)
    pools = [list(rng.permutation(g)) for g in groups]
    own = np.sqrt(1 - FAMILY_SHARE ** 2)
    families = []
    for _ in range(n_fam):
        avail = [g for g in range(n_groups) if pools[g]]
        if len(avail) < FAMILY_SIZE:
            break
        members = [int(pools[g].pop()) for g in rng.choice(avail, FAMILY_SIZE, replace=False)]
        shared = sparse_effect(rng, PARAMS_MOVED)
        for s in members:
            phenotype[s] = FAMILY_SHARE * shared + own * phenotype[s]
        families.append(sorted(members))
    return np.asarray(families, np.int64).reshape(-1, FAMILY_SIZE)


def relation_pairs(families: np.ndarray) -> pd.DataFrame:
    """Every pair within a family: sirna_a < sirna_b (class ids), family (0-based)."""
    rows = [(int(a), int(b), f) for f, fam in enumerate(families)
            for i, a in enumerate(fam) for b in fam[i + 1:]]
    return pd.DataFrame(rows, columns=["sirna_a", "sirna_b", "family"])


def sparse_effect(rng, n_moved: int) -> np.ndarray:
    v = np.zeros(N_PARAMS)
    idx = rng.choice(N_PARAMS, n_moved, replace=False)
    v[idx] = rng.choice([-1.0, 1.0], n_moved) * rng.uniform(0.7, 1.3, n_moved) * EFFECT_SIZE
    return v


def plate_layouts(exps: list[Experiment], des: dict, preset: dict, seed: int) -> pd.DataFrame:
    """One row per well: experiment, plate, well, sirna, well_type. Includes missing-well choice."""
    rows = []
    for e in exps:
        rng = np.random.default_rng([seed, 1, e.index])
        plate_groups = rng.permutation(layout.N_GROUPS)
        for plate in layout.PLATES:
            sirnas = list(des["groups"][plate_groups[plate - 1]]) + list(des["controls"])
            wells = rng.choice(len(layout.WELLS), len(sirnas), replace=False)
            for s, w in zip(rng.permutation(sirnas), sorted(wells)):
                wt = ("treatment" if s < layout.CONTROL_BASE else
                      "negative_control" if s == layout.NEGATIVE_CONTROL else "positive_control")
                rows.append((e.name, e.split, e.cell_type, e.index, plate, layout.WELLS[w], int(s), wt))
    df = pd.DataFrame(rows, columns=["experiment", "split", "cell_type", "exp_index", "plate",
                                     "well", "sirna", "well_type"])
    # A few treatment wells go missing, as in the real data (e.g. HUVEC-15).
    rng = np.random.default_rng([seed, 2])
    treat = np.flatnonzero(df.well_type.values == "treatment")
    # `missing` counts for the whole preset; a subset (--experiments) loses its share.
    n_all = sum(preset["train"]) + sum(preset["test"])
    n_drop = max(1, round(preset["missing"] * len({e.name for e in exps}) / n_all))
    drop = rng.choice(treat, min(n_drop, len(treat) // 10), replace=False)
    df = df.drop(index=drop).reset_index(drop=True)
    df.insert(0, "id_code", [layout.make_id_code(e, p, w)
                             for e, p, w in zip(df.experiment, df.plate, df.well)])
    return df


# ---------------------------------------------------------------- rendering

def render_site(params: np.ndarray, exp_fx: dict, size: int, rng) -> np.ndarray:
    """One site, (6, size, size) uint8, from the well's phenotype parameters."""
    p = dict(zip(PARAMS, params))
    r = min(size, 256)                       # render grid; upsampled for 512 px
    cell_r = 0.045 * r * np.exp(p["cell_size"])
    nuc_r = 0.45 * cell_r * np.exp(p["nucleus_size"])
    n_cells = rng.poisson(28 * np.exp(p["density"])) + 1
    elong = np.exp(0.5 * p["elongation"])
    axis = rng.integers(2)                   # orientation carries no label
    sy, sx = (elong, 1 / elong) if axis else (1 / elong, elong)

    centers = rng.uniform(0, r, (n_cells, 2))
    size_j = np.exp(rng.normal(0, 0.15, n_cells))
    bright = np.exp(rng.normal(0, 0.2, n_cells))
    ang = rng.uniform(0, 2 * np.pi, n_cells)
    golgi = centers + (nuc_r * (1.2 + 0.8 * np.tanh(p["golgi_offset"])))[..., None] * \
        np.stack([np.sin(ang), np.cos(ang)], 1)
    nucleoli = np.repeat(centers, 3, 0) + rng.normal(0, 0.35 * nuc_r, (3 * n_cells, 2))

    fy = np.fft.fftfreq(r)[:, None]
    fx = np.fft.rfftfreq(r)[None, :]

    def blur(points, weights, sigma):
        img = np.zeros((r, r))
        ij = np.floor(points).astype(int) % r
        np.add.at(img, (ij[:, 0], ij[:, 1]), weights)
        tf = np.exp(-2 * np.pi ** 2 * ((sigma * sy) ** 2 * fy ** 2 + (sigma * sx) ** 2 * fx ** 2))
        return np.fft.irfft2(np.fft.rfft2(img) * tf, s=(r, r)) * (2 * np.pi * sigma ** 2)

    w = bright * size_j ** 2
    cyto = blur(centers, w, cell_r)
    chans = np.stack([
        blur(centers, bright, nuc_r),                                               # w1 nuclei
        cyto,                                                                       # w2 ER
        np.clip(blur(centers, w, 1.15 * cell_r) - 0.75 * blur(centers, w, 0.85 * cell_r), 0, None),  # w3 actin ring
        blur(nucleoli, np.repeat(bright, 3) / 3, 0.3 * nuc_r),                      # w4 nucleoli
        cyto,                                                                       # w5 mitochondria
        blur(golgi, bright, 0.45 * nuc_r),                                          # w6 Golgi
    ])

    # Texture: multiplicative fine-grained noise whose amplitude is a phenotype.
    tex_amp = 0.35 * np.exp(np.array([p[f"texture_w{c}"] for c in layout.CHANNELS]))
    noise = rng.normal(size=(6, r, r))
    noise = np.fft.irfft2(np.fft.rfft2(noise) * np.exp(-2 * np.pi ** 2 * 1.2 ** 2 * (fy ** 2 + fx ** 2)),
                          s=(r, r))
    noise /= noise.reshape(6, -1).std(1)[:, None, None]
    chans *= np.clip(1 + tex_amp[:, None, None] * noise, 0, None)

    intensity = CHANNEL_SCALE * np.exp(np.array([p[f"intensity_w{c}"] for c in layout.CHANNELS]))
    # Full-resolution work in float32: it dominates the cost of a 512 px site.
    img = (chans * intensity[:, None, None] + 8).astype(np.float32)
    if size != r:
        img = img.repeat(size // r, 1).repeat(size // r, 2)
    img *= (exp_fx["gain"][:, None, None] * exp_fx["illum"](size)[None]).astype(np.float32)
    img += exp_fx["offset"][:, None, None].astype(np.float32)
    shot = np.sqrt(np.maximum(img, 0) * 0.5 + 4)
    img += rng.standard_normal(img.shape, dtype=np.float32) * shot
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def experiment_effects(e: Experiment, seed: int) -> dict:
    rng = np.random.default_rng([seed, 3, e.index])
    gain = np.exp(rng.normal(0, BATCH_GAIN_SD, 6))
    offset = rng.uniform(0, 15, 6)
    cy, cx = rng.uniform(0.2, 0.8, 2)
    strength = rng.uniform(0.15, 0.45)

    def illum(size):
        y = (np.arange(size) / size - cy) ** 2
        x = (np.arange(size) / size - cx) ** 2
        return 1 - strength * (y[:, None] + x[None, :]) / 0.5

    return dict(gain=gain, offset=offset, illum=illum)


def well_params(des: dict, cell_type: str, sirna: int, rng) -> np.ndarray:
    effect = des["response"][cell_type] @ des["phenotype"][sirna]
    return des["baseline"][cell_type] + effect + rng.normal(0, WELL_NOISE, N_PARAMS)


def _render_plate(task) -> list[tuple]:
    """Worker: render and write every site of some wells of one plate; returns pixel_stats rows."""
    out_dir, source_layout, exp, plate_df, des, size, seed = task
    fx = experiment_effects(exp, seed)
    plate_gain = np.exp(np.random.default_rng([seed, 4, exp.index, int(plate_df.plate.iloc[0])])
                        .normal(0, PLATE_GAIN_SD, 6))
    fx = dict(fx, gain=fx["gain"] * plate_gain)
    stats = []
    for r in plate_df.itertuples():
        rng = np.random.default_rng([seed, 5, exp.index, r.plate, layout.WELLS.index(r.well)])
        params = well_params(des, exp.cell_type, r.sirna, rng)
        for site in layout.SITES:
            img = render_site(params, fx, size, rng)
            for c in layout.CHANNELS:
                path = layout.png_path(out_dir, exp.split, exp.name, r.plate, r.well, site, c,
                                       source_layout)
                Image.fromarray(img[c - 1]).save(path, compress_level=3)
                ch = img[c - 1]
                stats.append((r.id_code, exp.name, r.plate, r.well, site, c, float(ch.mean()),
                              float(ch.std()), float(np.median(ch)), int(ch.min()), int(ch.max())))
    return stats


def synth(out_dir, preset="tiny", seed=0, experiments=None, image_size=None, workers=None,
          layout_name=layout.KAGGLE):
    """Write a synthetic dataset in the RxRx1 Kaggle layout (or, with layout_name
    'release', rxrx.ai's metadata.csv + images/); returns a summary dict.

    OUT_DIR must not exist, be empty, or hold a previous synth of the same
    parameters (its synth.json); anything else is refused, never overwritten."""
    if preset not in PRESETS:
        raise BadInput(f"--preset {preset!r}: unknown preset; choose one of "
                       f"{', '.join(sorted(PRESETS))}")
    cfg = dict(PRESETS[preset])
    size = cfg["image_size"] if image_size is None else image_size
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) \
            or size < 32 or (size > 256 and size % 256):
        raise BadInput(f"--image-size {image_size!r}: use 32..256, or a multiple of 256 "
                       "above that")
    size = int(size)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise BadInput(f"--seed {seed!r}: must be a non-negative integer")
    if workers is not None and (isinstance(workers, bool)
                                or not isinstance(workers, numbers.Integral) or workers < 1):
        raise BadInput(f"--workers {workers!r}: must be a positive integer (default: one "
                       "per core)")
    if layout_name not in layout.SOURCE_LAYOUTS:
        raise BadInput(f"--layout {layout_name!r}: choose one of "
                       f"{', '.join(layout.SOURCE_LAYOUTS)}")
    exps = limit_experiments(experiment_list(cfg), experiments)
    params = dict(preset=preset, seed=int(seed), image_size=size,
                  experiments=[e.name for e in exps], layout=layout_name)
    _check_out_dir(str(out_dir), params)
    os.makedirs(out_dir, exist_ok=True)
    write_bytes(os.path.join(out_dir, RUNNING_JSON), json.dumps(params))
    des = design(cfg, seed)
    wells = plate_layouts(exps, des, cfg, seed)

    t0 = time.time()
    for e in exps:
        for plate in layout.PLATES:
            folder = os.path.dirname(layout.png_path(out_dir, e.split, e.name, plate, "B02", 1, 1,
                                                     layout_name))
            os.makedirs(folder, exist_ok=True)
    by_exp = {e.name: e for e in exps}
    # Chunks of a plate, so a 512 px run shows progress and spreads over the cores.
    chunk = max(1, 4096 // size)
    tasks = [(out_dir, layout_name, by_exp[name], g.iloc[i:i + chunk], des, size, seed)
             for (name, _), g in wells.groupby(["experiment", "plate"], sort=True)
             for i in range(0, len(g), chunk)]
    workers = int(workers or os.cpu_count() or 1)
    stats = []
    with ProcessPoolExecutor(workers) as pool:
        for rows in tqdm(pool.map(_render_plate, tasks), total=len(tasks),
                         desc=f"synth {preset}", unit="chunk"):
            stats.extend(rows)

    if layout_name == layout.RELEASE:
        write_release_csvs(out_dir, wells, stats)
    else:
        write_csvs(out_dir, wells, stats)
    write_relations(os.path.join(out_dir, RELATIONS_CSV), relation_pairs(des["families"]))
    write_bytes(os.path.join(out_dir, SYNTH_JSON), json.dumps(
        dict(params, n_wells=len(wells), groups=des["groups"].tolist(),
             controls=des["controls"], families=des["families"].tolist()), indent=1))
    os.remove(os.path.join(out_dir, RUNNING_JSON))
    summary = dict(out_dir=str(out_dir), preset=preset, experiments=len(exps), wells=len(wells),
                   sites=2 * len(wells), image_size=size, seconds=round(time.time() - t0, 1))
    print(summary)
    return summary


def _check_out_dir(out_dir: str, params: dict) -> None:
    """Refuse any existing, non-empty directory but a synth of these same parameters:
    a user's real data must never be overwritten by `make synth DATA_DIR=...`."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise BadInput(f"{out_dir}: output directory is a file, not a directory")
    if not os.path.isdir(out_dir) or not os.listdir(out_dir):
        return
    path = os.path.join(out_dir, SYNTH_JSON)
    if not os.path.isfile(path) and os.path.isfile(os.path.join(out_dir, RUNNING_JSON)):
        path = os.path.join(out_dir, RUNNING_JSON)
    try:
        with open(path) as f:
            old = json.load(f)
    except FileNotFoundError:
        raise BadInput(f"{out_dir}: not empty and holds no {SYNTH_JSON}, so it is not a "
                       "synthetic dataset; synth writes only into a new or empty directory "
                       "(or over a synth of the same parameters)") from None
    except (OSError, ValueError) as e:
        raise BadInput(f"{path}: unreadable ({e}); synth writes only into a new or empty "
                       "directory") from None
    # A synth.json from before layouts existed is a Kaggle-layout synth.
    mine = ({k: old.get(k, layout.KAGGLE if k == "layout" else None) for k in params}
            if isinstance(old, dict) else None)
    if mine != params:
        raise BadInput(f"{out_dir}: holds a synth of other parameters ({path}: {mine}, asked "
                       f"for {params}); use another directory or delete this one")
