"""The distribution installs one top-level package, `exaserve`: no top-level `engine`, `kernels` or `server`
(other distributions own those names, e.g. Hugging Face's `kernels`), with the C++ sources and data inside."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_only_the_exaserve_package(tmp_path):
    src = tmp_path / "src"        # a copy, so the build leaves nothing in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("exaserve", "engine", "kernels", "server"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "dist").glob("exaserve-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/WHEEL"))
        top_level = zf.read(f"{info}/top_level.txt").decode().split()
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
    assert {n.split("/")[0] for n in names} == {"exaserve", info}
    assert top_level == ["exaserve"]
    assert "exaserve = exaserve.cli:main" in entry_points
    for needed in ("exaserve/__init__.py", "exaserve/cli.py", "exaserve/engine/model.py", "exaserve/server/app.py",
                   "exaserve/kernels/cpu/exa_cpu.cpp", "exaserve/engine/data/chat_template.jinja",
                   *(f"exaserve/kernels/cpu/{h.name}" for h in (ROOT / "kernels" / "cpu").glob("*.h"))):
        assert needed in names, needed


def test_the_code_passes_ruff():
    """The lint configuration in pyproject.toml holds for the whole tree."""
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
