"""exaserve bounds how long torch's OpenMP threads spin before sleeping (exaserve/__init__.py, issue 13)."""
import subprocess
import sys
import tempfile

import pytest

SHOW = ("import os, exaserve, torch; "
        "print(exaserve.OPENMP_SPIN, os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))")


def _run(code: str, **env) -> str:
    base = {k: v for k, v in __import__("os").environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    done = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                          timeout=120, cwd=tempfile.gettempdir())
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_exaserve_sets_a_short_spin_before_torch_loads():
    import exaserve
    assert _run(SHOW) == ["exaserve", str(exaserve.OPENMP_SPIN_COUNT), "None"]


@pytest.mark.parametrize("var", ["GOMP_SPINCOUNT", "OMP_WAIT_POLICY"])
def test_the_users_setting_stands(var):
    value = "12345" if var == "GOMP_SPINCOUNT" else "ACTIVE"
    out = _run(SHOW, **{var: value})
    assert out[0] == "user" and value in out[1:]


def test_torch_imported_first_is_reported():
    code = "import torch; " + SHOW.replace("import os, exaserve, torch; ", "import os, exaserve; ")
    assert _run(code) == ["late", "None", "None"]


def test_torch_imported_first_warns_on_the_cpu_path():
    code = ("import logging, torch; logging.basicConfig(); "
            "from exaserve.kernels import cpu; assert cpu.load() is not None")
    base = {k: v for k, v in __import__("os").environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    done = subprocess.run([sys.executable, "-c", code], env=base, capture_output=True, text=True, timeout=600,
                          cwd=tempfile.gettempdir())
    assert done.returncode == 0, done.stderr
    assert "torch was imported before exaserve" in done.stderr
