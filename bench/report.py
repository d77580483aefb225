"""`make bench` (last step): merge bench/results_{prep,loader,train,compare*}.json
into bench/results.json and a markdown table bench/results.md, with the machine."""
from __future__ import annotations

import json
import os
import platform

from shards.atomic import write_bytes

HERE = os.path.dirname(os.path.abspath(__file__))


# make compare, make compare-long and make compare-selected (bench/compare.py).
COMPARE_PARTS = ("compare_recipes", "compare", "compare_long", "compare_selected")
PARTS = ("prep", "loader", "train", *COMPARE_PARTS)


def result_path(name: str) -> str:
    return os.path.join(HERE, f"results_{name}.json")


def _load(name):
    path = result_path(name)
    return json.load(open(path)) if os.path.isfile(path) else None


def machine() -> str:
    """The host in one line, CPU capability included: figures differ between hosts of one kind."""
    from common.precision import cpu_capability
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu} ({cpu_capability()}), {os.cpu_count()} cores, {mem:.0f} GiB, {gpu}"


def table(results: dict) -> str:
    # each part says where it was measured (a part re-run on another host changes only its own)
    hosts = list(dict.fromkeys(results[n].get("machine") or "unknown host"
                               for n in ("prep", "loader", "train") if results.get(n)))
    lines = [f"Measured on: {'; '.join(hosts) or 'no part measured'}", "",
             "| benchmark | figure | value | goal |", "| --- | --- | --- | --- |"]
    p = results.get("prep")
    if p:
        for k, s in sorted(p["sizes"].items()):
            lines.append(f"| prep, {s['experiments']} exp. ({s['sites']} sites, 512 px) | sites/s (pure decode) | "
                         f"{s['prep_sites_per_s']:.1f} ({s['decode_sites_per_s']:.1f}) | |")
            lines.append(f"| | ratio to pure decode | {s['ratio_to_decode']:.2f} | ≥ 0.8 |")
            lines.append(f"| | store + shards bytes / PNG bytes | {s['zarr_bytes'] / s['png_bytes']:.2f} + "
                         f"{s['shard_bytes'] / s['png_bytes']:.2f} | |")
            lines.append(f"| | peak RSS, process tree | {s['peak_rss_tree_mb']:.0f} MB | flat |")
    ld = results.get("loader")
    if ld:
        for name, c in ld["cases"].items():
            lines.append(f"| loader, 512 px, 5 ch, augment, batch {ld['batch_size']} | {name} samples/s | "
                         f"{c['samples_per_s']:.0f} | |")
        r = ld["ratios"]
        lines.append(f"| | DALI-CPU / reference-style | {r['dali_cpu_vs_reference']:.2f}× | ≥ 5× |")
        lines.append(f"| | DALI-CPU / raw read | {r['dali_cpu_vs_raw_read']:.2f} | ≥ 0.2 |")
    t = results.get("train")
    if t:
        for name, c in t["cases"].items():
            lines.append(f"| train {c['model']} {c['image_size']} px, batch {c['batch_size']} | "
                         f"img/s synthetic / with loader | {c['synthetic']['images_per_s']:.1f} / "
                         f"{c['loader']['images_per_s']:.1f} | loader keeps up |")
    for name in COMPARE_PARTS:
        if results.get(name):
            from bench.compare_table import format_table
            lines += ["", format_table(results[name])]
    return "\n".join(lines)


def main():
    """Merge bench/results_{prep,loader,train,compare*}.json into
    bench/results.json and bench/results.md."""
    results = {}
    for name in PARTS:
        r = _load(name)
        if r is not None:
            results[name] = r
    write_bytes(os.path.join(HERE, "results.json"), json.dumps(results, indent=1))
    md = table(results)
    write_bytes(os.path.join(HERE, "results.md"), md + "\n")
    print(md)
    print("\nwrote bench/results.json and bench/results.md")


if __name__ == "__main__":
    from common.cli import run_command
    run_command("bench.report", main)
