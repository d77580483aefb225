"""The 512 px store the loader and train benchmarks share: one `full`-preset
experiment under bench/out/, generated and packed once, reused after."""
from __future__ import annotations

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
OUT = os.path.join(HERE, "out")
DATA = os.path.join(OUT, "data_full1")
STORE = os.path.join(OUT, "loader_store1")


def ensure_store(workers):
    if not os.path.isfile(os.path.join(DATA, "synth.json")):
        subprocess.run([sys.executable, "-m", "prep", "synth", "--preset", "full",
                        "--experiments", "1", "--out-dir", DATA, "--workers", str(workers)],
                       cwd=REPO, check=True)
    if not os.path.isfile(os.path.join(STORE, "manifest.json")):
        subprocess.run([sys.executable, "-m", "prep", "shards", "--data-dir", DATA,
                        "--out-dir", STORE, "--workers", str(workers)], cwd=REPO, check=True)
