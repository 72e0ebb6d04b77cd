"""``pip install .`` (not editable) ships csrc/ and the Triton kernels and runs the CLI."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--target", str(target), str(ROOT)],
                   check=True, cwd=target)
    return target


def test_installed_package_ships_sources(installed):
    pkg = installed / "fbnet_fast"
    for src in ROOT.joinpath("csrc").rglob("*"):
        if src.suffix in (".cpp", ".cu", ".h", ".cuh"):
            assert (pkg / "csrc" / src.relative_to(ROOT / "csrc")).is_file(), src
    for src in ROOT.joinpath("kernels").glob("*.py"):
        assert (pkg / "kernels" / src.name).is_file(), src
    assert not (installed / "kernels").exists(), "no top-level 'kernels' module"


def _run(installed, *args):
    env = dict(os.environ, PYTHONPATH=str(installed))
    return subprocess.run(args, cwd=installed, env=env, capture_output=True, text=True)


def test_installed_cli_info(installed):
    out = _run(installed, sys.executable, "-m", "fbnet_fast", "info", "fbnet_c")
    assert out.returncode == 0, out.stderr
    assert "385.0" in out.stdout and "5,572,200" in out.stdout
    script = installed / "bin" / "fbnet-fast"
    out = _run(installed, sys.executable, str(script), "info", "fbnet_a")
    assert out.returncode == 0, out.stderr
    assert "249.9" in out.stdout


def test_cli_error_is_one_line(installed):
    out = _run(installed, sys.executable, "-m", "fbnet_fast", "info", "no_such_net")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "unknown architecture 'no_such_net'" in out.stderr
