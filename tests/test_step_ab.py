"""benchmarks/step_ab.py: variants alternate in fresh processes with their own environment or checkout."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from exaserve.engine.tiny import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_ab.py"), *args], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)


def test_variants_alternate_and_table(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "m", preset="tiny", dtype="bfloat16", with_mtp=False)
    # another checkout: its child must import this copy, not the installed package (torch kernels: no C++ build)
    other = tmp_path / "checkout"
    for d in ("exaserve", "engine", "kernels", "server"):
        shutil.copytree(ROOT / d, other / d, ignore=shutil.ignore_patterns("__pycache__"))
    # each (round, batch, variant) is a fresh process (~5 s): two rounds of one batch size keep the suite short
    done = run("--model", str(ckpt), "--batch", "2", "--rounds", "2", "--steps", "3", "--repeats", "2",
               "--variant", "a=", "--variant", f"b@{other}=EXASERVE_ARGMAX_SCREEN=0 EXASERVE_KERNELS=torch")
    assert done.returncode == 0, done.stderr
    runs = [line.split() for line in done.stdout.splitlines() if line.startswith("round")]
    # round r, batch, variant: a before b in each round
    assert [(r[1], r[3], r[4]) for r in runs] == [(str(r), "2", v) for r in (1, 2) for v in ("a", "b")]
    table = [line.split() for line in done.stdout.split("vs a")[1].strip().splitlines()]
    assert [(t[0], t[1]) for t in table] == [("2", v) for v in ("a", "b")]
    assert all(t[-1] == "1.00x" for t in table if t[1] == "a")
    assert all(float(x) > 0 for t in table for x in t[2:-1])


@pytest.mark.parametrize("args, message", [
    (["--variant", "=X=1"], "use NAME=ENV"),
    (["--variant", "a=X"], "'X' is not VAR=VALUE"),
    (["--variant", "a@/nonexistent="], "/nonexistent has no engine/"),
    (["--model", "/nonexistent/ckpt"], "no checkpoint at /nonexistent/ckpt"),
])
def test_bad_arguments(args, message, tmp_path):
    done = run(*args, "--model", str(tmp_path / "none")) if "--model" not in args else run(*args)
    assert done.returncode != 0 and message in done.stderr
