"""`make demo` — the whole pipeline on synthetic data, ending in a results table.

    python -m demo [--out-dir demo_out] [--channels "[1,2,3,4,5];[1,2,3,5,6]"|all]
                   [--folds 0,1|all] [--config-overrides configs/demo.yml] [--fresh]
                   [--layout kaggle|release]

Every step is the real command a user would type (printed before it runs), so
the demo doubles as a transcript of the full RxRx1 path. Steps whose output
exists are skipped by the commands themselves (prep resumes, finished training
runs are skipped), so a second `make demo` only redoes what is missing.
Writes OUT/results.json, OUT/results.md and OUT/curves.png.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time

from common.arglists import parse_folds, parse_subsets
from common.cli import run_command
from common.errors import BadInput
from common.run_layout import METRICS, channels_dirname, find_run_dirs

PY = sys.executable


def _run(cmd: list[str], log) -> None:
    line = " ".join(shlex.quote(c) for c in cmd)
    print(f"\n$ {line}", flush=True)
    log.write(f"$ {line}\n")
    log.flush()
    proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"demo: step failed (exit {proc.returncode}): {line}\n"
                         f"see the log: {log.name}")


def _runs(logdir: str, part: str, model: str):
    """(run label such as `[1,2,3,4,5]/fold_0`, its metrics.jsonl rows) for every run of a part."""
    root = os.path.join(logdir, part)
    for run in find_run_dirs(root, model_names=[model]):
        path = os.path.join(run.path, METRICS)
        if not os.path.isfile(path):
            continue
        label = os.path.relpath(os.path.dirname(run.path), root)
        with open(path) as f:
            yield label, [json.loads(line) for line in f if line.strip()]


def _best_metrics(logdir: str, part: str, model: str) -> dict:
    """Mean over runs of each run's best epoch (by accuracy03) on its validation wells."""
    best = [max(rows, key=lambda r: (r.get("valid_accuracy03", 0), -r["epoch"]))
            for _, rows in _runs(logdir, part, model)]
    n = len(best)
    if not n:
        return dict(runs=0, valid_top1=None, valid_top3=None)
    return dict(runs=n, valid_top1=sum(b["valid_accuracy01"] for b in best) / n,
                valid_top3=sum(b["valid_accuracy03"] for b in best) / n)


def _curves(logdir: str, model: str, out_png: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharey=True)
    for ax, part in zip(axes, ("control", "finetune", "pseudo")):
        for label, rows in _runs(logdir, part, model):
            ax.plot([r["epoch"] for r in rows], [r["valid_accuracy01"] for r in rows], label=label)
        ax.set_title(f"{part}: validation top-1 per epoch")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("top-1 accuracy (wells)")
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)


def _check_layout(data: str, layout: str) -> None:
    """An earlier demo's data in the other layout is not silently reused."""
    with open(os.path.join(data, "synth.json")) as f:
        had = json.load(f).get("layout", "kaggle")
    if had != layout:
        raise BadInput(f"{data} holds the {had} layout from an earlier demo, not --layout "
                       f"{layout}; add --fresh to start over (or use another --out-dir)")


def main(out_dir="demo_out", channels="[1,2,3,4,5]", folds="0", n_folds=5,
         preset="demo", seed=0, config_overrides="configs/demo.yml", model_name="resnet18",
         workers: int | None = None, fresh=False, min_confidence=0.6, layout="kaggle"):
    """Run synth -> shards -> verify -> folds -> control -> finetune -> ensemble ->
    pseudo-labels -> pseudo -> ensemble -> score, and print the results table.

    --layout kaggle (default) or release: the RxRx1 layout the synthetic data is written
    in (the competition's CSVs, or rxrx.ai's metadata.csv, whose public test labels the
    score reads); every later command is the same for both."""
    from infer import score_submission
    from shards.layout import SOURCE_LAYOUTS

    # Bad options stop before anything is made or removed.
    subsets = parse_subsets(channels, "--channels")
    fold_list = parse_folds(folds, int(n_folds), "--folds")
    if layout not in SOURCE_LAYOUTS:
        raise BadInput(f"--layout {layout!r}: choose one of {', '.join(SOURCE_LAYOUTS)}")
    out_dir = os.path.abspath(out_dir)
    if fresh and os.path.isdir(out_dir):
        import shutil
        shutil.rmtree(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    data, store, logs, pred = (os.path.join(out_dir, d) for d in ("data", "store", "logs", "pred"))
    csv = os.path.join(store, "csv")
    workers = str(workers or os.cpu_count() or 1)
    times: dict[str, float] = {}
    log = open(os.path.join(out_dir, "demo.log"), "a")
    print(f"cellshard demo: {len(subsets)} channel subset(s) x {len(fold_list)} fold(s), "
          f"model {model_name}; full log in {log.name}")

    def step(name, *cmds):
        t0 = time.time()
        for cmd in cmds:
            _run(cmd, log)
        times[name] = times.get(name, 0.0) + time.time() - t0
        print(f"  [{name}: {times[name]:.0f} s]", flush=True)

    train_args = ["--overrides", config_overrides, "--shards", store, "--logdir", logs,
                  "--model-name", model_name]
    chans = [channels_dirname(c) for c in subsets]

    if not os.path.isfile(os.path.join(data, "synth.json")):
        step("synth", [PY, "-m", "prep", "synth", "--preset", preset, "--seed", str(seed),
                       "--out-dir", data, "--workers", workers, "--layout", layout])
    else:
        _check_layout(data, layout)
    step("shards", [PY, "-m", "prep", "shards", "--data-dir", data, "--out-dir", store,
                    "--workers", workers],
         [PY, "-m", "prep", "verify", store],
         [PY, "-m", "prep", "folds", "--data-dir", data, "--n-folds", str(n_folds),
          "--out-dir", csv])
    step("control", *[[PY, "-m", "train", "control", "--channels", c, *train_args] for c in chans])
    step("finetune", *[[PY, "-m", "train", "finetune", "--channels", c, "--fold", str(k),
                        *train_args] for c in chans for k in fold_list])

    def predict_and_ensemble(part):
        root = os.path.join(pred, part)
        predict = [PY, "-m", "infer", "predict-all", "--shards", store, "--data-dir", data,
                   "--model-root", os.path.join(logs, part), "--model-name", model_name,
                   "--out-dir", root, "--tta", "8"]
        step(f"predict {part}", predict,
             [PY, "-m", "infer", "ensemble", "--data-dir", data, "--predict-root", root,
              "--no-assign", "--out", os.path.join(root, "submission_no_assign.csv"),
              "--overwrite"],
             [PY, "-m", "infer", "ensemble", "--data-dir", data, "--predict-root", root,
              "--out", os.path.join(root, "submission.csv"), "--overwrite"])
        return root

    ft_root = predict_and_ensemble("finetune")
    step("pseudo-labels", [PY, "-m", "infer", "pseudo-labels", "--data-dir", data,
                           "--predict-root", ft_root, "--folds-dir", csv,
                           "--out-dir", os.path.join(csv, "pseudo"),
                           "--min-confidence", str(min_confidence), "--overwrite"])
    step("pseudo", *[[PY, "-m", "train", "pseudo", "--channels", c, "--fold", str(k),
                      *train_args] for c in chans for k in fold_list])
    ps_root = predict_and_ensemble("pseudo")

    truth = data  # its test labels: metadata.csv (release) or test_truth.csv (synthetic Kaggle)
    test = {}
    for part, root in (("finetune", ft_root), ("pseudo", ps_root)):
        s = score_submission(os.path.join(root, "submission.csv"), truth)["all"]
        test[part] = dict(no_assignment=s["argmax (no assignment)"], plate_assignment=s["submission"],
                          wells=s["n"])
    parts = {p: _best_metrics(logs, p, model_name) for p in ("control", "finetune", "pseudo")}
    n_pseudo = sum(1 for _ in open(os.path.join(csv, "pseudo", "pseudo_test.csv"))) - 1 \
        if os.path.isfile(os.path.join(csv, "pseudo", "pseudo_test.csv")) else None
    results = dict(preset=preset, seed=seed, model=model_name, channels=chans, folds=fold_list,
                   parts=parts, test=test, pseudo_rows=n_pseudo,
                   seconds={k: round(v, 1) for k, v in times.items()},
                   total_seconds=round(sum(times.values()), 1))
    _curves(logs, model_name, os.path.join(out_dir, "curves.png"))
    table = format_results(results)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    print("\n" + table)
    print(f"\nwrote {out_dir}/results.json, results.md, curves.png")


def format_results(r: dict) -> str:
    def f(v):
        return "—" if v is None else f"{v:.3f}"
    lines = [f"### cellshard demo — preset `{r['preset']}`, model `{r['model']}`, "
             f"subsets {', '.join(r['channels'])}, folds {r['folds']}", "",
             "| part | runs | valid top-1 | valid top-3 |", "| --- | --- | --- | --- |"]
    for p, m in r["parts"].items():
        lines.append(f"| {p} | {m['runs']} | {f(m['valid_top1'])} | {f(m['valid_top3'])} |")
    lines += ["", "| test set (ensemble of all runs) | no assignment | plate assignment |",
              "| --- | --- | --- |"]
    for p, m in r["test"].items():
        name = "after Part II (finetune)" if p == "finetune" else "after Part III (pseudo)"
        lines.append(f"| {name}, {m['wells']} wells | {f(m['no_assignment'])} | "
                     f"{f(m['plate_assignment'])} |")
    lines += ["", "| step | wall time |", "| --- | --- |"]
    lines += [f"| {k} | {v:.0f} s |" for k, v in r["seconds"].items()]
    lines.append(f"| **total** | **{r['total_seconds']:.0f} s** |")
    return "\n".join(lines)


if __name__ == "__main__":
    run_command("demo", main)
