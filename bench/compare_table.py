"""The table of `make compare`'s results (bench/results_compare*.json): per recipe, test
accuracy with and without the plate assignment over data seeds, and the change against the
reference on the same seeds.  Read by bench.compare and bench.report."""
from __future__ import annotations

import statistics

DEMO_YML = "configs/demo.yml"


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def summarize(runs: list[dict]) -> list[dict]:
    """Per recipe (in first-seen order): seeds, accuracies, mean time, and the change of the
    assigned accuracy against the reference on the same seeds."""
    recipes = list(dict.fromkeys(r["recipe"] for r in runs))
    ref = {r["seed"]: r["plate_assignment"] for r in runs if r["recipe"] == "reference"}
    out = []
    for name in recipes:
        rs = [r for r in runs if r["recipe"] == name]
        deltas = [r["plate_assignment"] - ref[r["seed"]] for r in rs if r["seed"] in ref]
        out.append({"recipe": name, "seeds": [r["seed"] for r in rs],
                    "no_assignment": [r["no_assignment"] for r in rs],
                    "plate_assignment": [r["plate_assignment"] for r in rs],
                    "delta": deltas if name != "reference" else [],
                    "seconds": statistics.mean(r["seconds"] for r in rs)})
    return out


def format_table(results: dict) -> str:
    c = results["config"]
    lines = [f"### make compare — preset `{c['preset']}`, model `{c['model']}`, "
             f"subsets {', '.join(c['channels'])}, folds {c['folds']}, "
             f"overrides `{c.get('overrides', DEMO_YML)}`", "",
             "Test accuracy of the ensemble (mean ± sd over data seeds); Δ = plate-assigned "
             "accuracy minus the reference's on the same seeds.", "",
             "| recipe | seeds | no assignment | plate assignment | Δ vs reference | "
             "wall time / seed |", "| --- | --- | --- | --- | --- | --- |"]
    for s in summarize(results["runs"]):
        delta = "" if s["recipe"] == "reference" else _signed(s["delta"])
        lines.append(f"| {s['recipe']} | {','.join(map(str, s['seeds']))} | "
                     f"{_mean_sd(s['no_assignment'])} | {_mean_sd(s['plate_assignment'])} | "
                     f"{delta} | {s['seconds']:.0f} s |")
    if results.get("machine"):
        lines += ["", f"Measured on: {results['machine']}"]
    return "\n".join(lines)


def _signed(values: list[float]) -> str:
    if not values:
        return "—"
    m = statistics.mean(values)
    sd = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
    return f"{m:+.3f}{sd}"
