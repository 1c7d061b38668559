"""A non-editable wheel carries kernels/ and the installed package finds them."""
import os
import subprocess
import sys
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
    # Install the wheel (not the source tree) into its own folder and put it first on the path:
    # the dependencies come from this environment, the package and its kernels from the wheel.
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--target", str(target), str(wheel)], check=True)
    code = ("import importlib.util, retention\n"
            "from importlib.resources import files\n"
            "import retention.kernels.triton as kt\n"
            "from retention.backends.torch import power_retention as pr\n"
            "import importlib; mod = importlib.import_module(pr.__module__)\n"
            "kernel, why = mod._kernel_module()\n"
            "assert (files('retention.kernels') / 'metal').is_dir()\n"
            "print(retention.__file__); print(kt.__file__); print(why)\n")
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         cwd=tmp_path, env=env)
    lines = out.stdout.splitlines()
    assert lines[0] == str(target / "retention" / "__init__.py")
    assert lines[1] == str(target / "retention" / "kernels" / "triton" / "__init__.py")
    assert "could not be imported" not in lines[2]
