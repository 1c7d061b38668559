"""A non-editable wheel carries kernels/ and the installed package finds them."""
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(ROOT)], check=True)
    (whl,) = out.glob("retention_llm-*.whl")
    return whl


def test_wheel_contains_kernels_and_backends(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "retention/kernels/__init__.py" in names
    assert "retention/kernels/triton/__init__.py" in names
    assert any(n.startswith("retention/kernels/metal/") for n in names)
    for backend in ("torch", "mlx"):
        assert f"retention/backends/{backend}/model.py" in names
    assert any(n.endswith("entry_points.txt") for n in names)


def test_installed_wheel_finds_kernels(wheel, tmp_path):
    env = tmp_path / "venv"
    venv.create(env, with_pip=True)
    py = env / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True)
    code = ("import importlib.util, retention, retention.kernels as k\n"
            "from importlib.resources import files\n"
            "spec = importlib.util.find_spec('retention.kernels.triton')\n"
            "assert 'site-packages' in spec.origin, spec.origin\n"
            "assert (files('retention.kernels') / 'metal').is_dir()\n"
            "print(spec.origin)\n")
    out = subprocess.run([str(py), "-c", code], check=True, capture_output=True, text=True,
                         cwd=tmp_path)
    assert "site-packages/retention/kernels/triton/__init__.py" in out.stdout
