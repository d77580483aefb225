"""Every benchmark answers --help (exit 0) and refuses a bad option in one line (exit 2),
without building its 512 px store first."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("module", ["prep", "loader", "train", "report", "gpu_check"])
def test_help_exits_0(module):
    out = _run(f"bench.{module}", "--help")
    assert out.returncode == 0, out.stderr
    assert f"bench.{module}" in out.stdout + out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("args, named", [
    (("bench.loader", "--case", "nope"), "--case 'nope'"),
    (("bench.train", "--cases", "small,nope"), "--cases: nope"),
    (("bench.train", "--amp", "fp8"), "--amp 'fp8'"),
])
def test_bad_option_is_one_line_and_exit_2(args, named):
    out = _run(*args)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], out.stderr
