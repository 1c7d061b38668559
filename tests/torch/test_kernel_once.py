"""benchmarks/kernel_once.py (one fwd+bwd for ncu / compute-sanitizer to wrap) runs on the CPU
under the Triton interpreter at a tiny shape, with and without states, and says what it ran."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernel_once.py"


@pytest.mark.parametrize("extra", [["--state", "--chunk", "16", "--kv-heads", "1"], []],
                         ids=["chunks-with-state", "one-chunk"])
def test_kernel_once_runs_interpreted(extra):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--T", "40", "--batch", "1", "--heads",
                           "2", "--d", "16", *extra], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = proc.stdout.strip().splitlines()[-1]
    assert "T=40" in line and "triton interpreter" in line and "gradients finite: True" in line
    assert ("state=True" in line) == ("--state" in extra)
