"""`make bench-train`: images/s of a training step, with the loader and without it.

Two cases, as the recipe runs them (Nadam, label-smoothing CE, autocast
bf16 — fp16 on a GPU without bf16 —, channels_last, five channels
[1,2,3,5,6], batch `--batch`):
  * small: resnet18 at 128 px;
  * senet: seresnext50_32x4d (the reference's se_resnext50_32x4d) at 256 px.
Each is timed three ways after `warmup` steps:
  * synthetic: random tensors already on the device — the model alone;
  * loader: `shards.make_loader` over the train wells of a 512 px store
    (random site, training augmentation, resize on delivery) feeding the
    same steps — the gap to `synthetic` says whether the loader keeps up;
  * loader alone: the same loader with no model — its ceiling here.
Store: bench/out/loader_store1 (made by `make bench-loader`, or here with
`prep synth --preset full --experiments 1` + `prep shards`), reused.
Figures are medians of per-step rates (robust to bursts of other work on a
shared machine); means are in the JSON too.
Prints a table and writes bench/results_train.json.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
import torch
import torch.nn as nn

from bench.full_store import HERE, REPO, STORE, ensure_store
from shards.atomic import write_bytes

RESULTS = os.path.join(HERE, "results_train.json")
CHANNELS = (1, 2, 3, 5, 6)
CASES = {  # name: (timm model, image size, default batch on CPU, on GPU)
    "small": ("resnet18", 128, 32, 128),
    "senet": ("se_resnext50_32x4d", 256, 16, 64),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(model_name, device, dtype, channels_last):
    from common.precision import autocast
    from train.factory import create_model
    from train.schedule import make_optimizer
    torch.manual_seed(0)
    model = create_model("cell_senet", model_name=model_name, num_classes=1108,
                         n_channels=len(CHANNELS)).to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    model.train()
    opt = make_optimizer(model.parameters(), "Nadam", lr=1e-4)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)

    def step(images, labels):
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, dtype):
            logits = model(images)
        loss = criterion(logits.float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def timed(batches, step, warmup, steps, device):
    """images/s over `steps` steps after `warmup`; `step` None times the batches alone.

    Each step is timed from the end of the previous one (so a wait for the
    loader counts); the headline figure uses the median step, which a burst
    of other work on a shared machine moves less than the mean."""
    times, sizes = [], []
    first = None
    start = last = time.perf_counter()
    for i, (images, labels, *_rest) in enumerate(batches):
        if step is not None:
            step(images, labels)
        elif images.device.type == "cuda":
            images.sum()
        sync(device)
        now = time.perf_counter()
        if first is None:
            first = now - start
        if i >= warmup:
            times.append(now - last)
            sizes.append(images.shape[0])
        last = now
        if i + 1 == warmup + steps:
            break
    if not times:
        raise RuntimeError(f"the loader gave fewer than {warmup + 1} batches; lower --warmup/--steps")
    times, sizes = np.array(times), np.array(sizes)
    return {"images": int(sizes.sum()), "seconds": float(times.sum()),
            "images_per_s": float(np.median(sizes / times)),
            "images_per_s_mean": float(sizes.sum() / times.sum()), "first_batch_s": first,
            "step_s_min_median_max": [float(times.min()), float(np.median(times)), float(times.max())]}


def synthetic(batch, size, device, count):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, len(CHANNELS), size, size, generator=g).to(device)
    y = torch.randint(0, 1108, (batch,), generator=g).to(device)
    for _ in range(count):
        yield x, y


def loader_batches(size, batch, device, workers, backend, epochs):
    from shards import LoaderSpec, make_loader
    loader = make_loader(STORE, "train", LoaderSpec(
        channels=CHANNELS, norm="site", sites="random", image_size=size, batch_size=batch,
        augment=True, channel_dropout=0.5, shear_deg=10.0, shear_p=0.5, seed=0,
        backend=backend, device=str(device), num_workers=workers, label_column=None))

    def gen():
        for e in range(epochs):
            loader.set_epoch(e)
            for images, _labels, rows in loader:
                # the store's train wells include controls: any labels do for timing
                yield images, (rows % 1108).to(images.device), rows
    return loader, gen()


def main(steps=20, senet_steps=8, warmup=3, batch: int | None = None, workers: int | None = None,
         backend="auto", cases="small,senet", device: str | None = None, amp="auto"):
    """Time a training step with synthetic tensors and fed by the loader (writes bench/results_train.json).

    Args:
        steps: timed steps of the small case (resnet18, 128 px).
        senet_steps: timed steps of the senet case (seresnext50, 256 px).
        warmup: untimed steps before each measurement.
        batch: batch size of every case (default: per case, larger on a GPU).
        workers: loader workers (default: all cores).
        backend: loader backend, auto|dali|torch.
        cases: comma list of small,senet.
        device: cpu or cuda[:N] (default: cuda where present).
        amp: auto|bf16|fp16|none, as the trainer's args.amp (auto: fp32 on a CPU without native bf16).
    """
    from common.arglists import parse_names
    from common.errors import BadInput
    from common.precision import AMP_MODES, amp_dtype, cpu_capability
    if amp not in AMP_MODES:
        raise BadInput(f"--amp {amp!r} unknown; valid: {', '.join(AMP_MODES)}")
    names = parse_names(cases, "--cases") or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise BadInput(f"--cases: {', '.join(unknown)} unknown; valid: {', '.join(CASES)}")
    workers = int(workers or os.cpu_count() or 1)
    ensure_store(workers)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    dtype = amp_dtype(amp, device)
    channels_last = True   # the trainer's default (args.channels_last: auto = on, CPU and GPU)
    if gpu:
        torch.backends.cudnn.benchmark = True
    results = {"device": str(device) if not gpu else torch.cuda.get_device_name(device),
               "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "workers": workers, "amp": str(dtype).replace("torch.", "") if dtype else "fp32",
               "cpu_capability": cpu_capability(),
               "channels": list(CHANNELS), "store": os.path.relpath(STORE, REPO),
               "load_avg_before": list(os.getloadavg()), "cases": {}}
    for name in names:
        model_name, size, cpu_batch, gpu_batch = CASES[name]
        b = int(batch or (gpu_batch if gpu else cpu_batch))
        n = int(senet_steps if name == "senet" else steps)
        print(f"{name}: {model_name} {size}px batch {b}, {warmup} warmup + {n} steps", flush=True)
        step = make_step(model_name, device, dtype, channels_last)
        syn = timed(synthetic(b, size, device, warmup + n), step, warmup, n, device)
        print(f"  synthetic      {syn['images_per_s']:8.1f} img/s", flush=True)
        loader, batches = loader_batches(size, b, device, workers, backend, epochs=100)
        with_loader = timed(batches, step, warmup, n, device)
        batches.close()
        print(f"  with loader    {with_loader['images_per_s']:8.1f} img/s ({loader.backend})", flush=True)
        loader, batches = loader_batches(size, b, device, workers, backend, epochs=100)
        alone = timed(batches, None, warmup, max(n, 10), device)
        batches.close()
        print(f"  loader alone   {alone['images_per_s']:8.1f} img/s", flush=True)
        results["cases"][name] = {
            "model": model_name, "image_size": size, "batch_size": b, "backend": loader.backend,
            "synthetic": syn, "loader": with_loader, "loader_alone": alone,
            "loader_keeps_up": with_loader["images_per_s"] >= 0.9 * syn["images_per_s"],
            "ratio_loader_to_synthetic": with_loader["images_per_s"] / syn["images_per_s"],
        }
        del step
    results["load_avg_after"] = list(os.getloadavg())
    from bench.report import machine
    results["machine"] = machine()   # where these figures were measured
    write_bytes(RESULTS, json.dumps(results, indent=1))
    print_table(results)
    return None


def print_table(r):
    print(f"\ntraining images/s on {r['device']} ({r['cores']} cores, CPU {r.get('cpu_capability')}, "
          f"{r['torch_threads']} torch threads, {r['workers']} loader workers, autocast {r['amp']}):")
    print(f"{'case':<8}{'model':<22}{'px':>5}{'batch':>6}{'synthetic':>11}{'+loader':>10}"
          f"{'ratio':>7}{'loader alone':>14}")
    for name, c in r["cases"].items():
        print(f"{name:<8}{c['model']:<22}{c['image_size']:>5}{c['batch_size']:>6}"
              f"{c['synthetic']['images_per_s']:>11.1f}{c['loader']['images_per_s']:>10.1f}"
              f"{c['ratio_loader_to_synthetic']:>7.2f}{c['loader_alone']['images_per_s']:>14.1f}")
    print(f"(written to {os.path.relpath(RESULTS, REPO)})")


if __name__ == "__main__":
    from common.cli import run_command
    run_command("bench.train", main)
