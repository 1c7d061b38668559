"""benchmarks/kernel_timeline.py without a GPU: the timeline summary on a known timeline, and
the probe wrapper's signature and (with triton's CUDA backend) its compile for sm_90a."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import kernel_timeline  # noqa: E402
from sm90_compile import cuda_backend_available  # noqa: E402


def test_summary_of_a_known_timeline():
    """Two multiprocessors, two programs each: A 0-100 us and B 0-50 on the first, C 0-100
    and D 10-60 on the second; A and C are axis-1 group 0, B and D group 1."""
    us = 1000
    rows = np.array([[0, 100 * us, 0, 0], [0, 50 * us, 0, 1],
                     [0, 100 * us, 1, 0], [10 * us, 60 * us, 1, 1]], dtype=np.int64)
    rows[:, :2] += 5_000_000_000   # the clock's origin is arbitrary
    s = kernel_timeline.summarize(rows)
    assert (s["span_us"], s["programs"], s["multiprocessors"], s["slots"]) == (100, 4, 2, 2)
    assert s["busy"] == 0.75                  # 300 us busy of 2 x 2 slots x 100 us
    assert s["under_90pct_us"] == 60          # 0-10 us (3 running) and 50-100 (3, then 2)
    assert (s["length_mean_us"], s["length_max_us"], s["last_start_us"]) == (75, 100, 10)
    assert s["by_axis1"] == {0: [100, 100, 2], 1: [50, 50, 2]}


def test_back_to_back_programs_share_no_slot():
    """A program starting as another ends on the same multiprocessor is not counted as
    running beside it."""
    rows = np.array([[0, 10, 0, 0], [10, 20, 0, 0]], dtype=np.int64) * 1000
    s = kernel_timeline.summarize(rows)
    assert (s["slots"], s["busy"], s["under_90pct_us"]) == (1, 1.0, 0)


def test_probe_wrapper_takes_the_kernels_parameters():
    from retention.kernels.triton import rowwise

    kernel = rowwise._gate_cumsum
    src = kernel_timeline.wrapper_source(kernel)
    assert "def probe__gate_cumsum(PROBE, LG, BG, EK, T, H, Tp, C: tl.constexpr, " \
           "BT: tl.constexpr, KB: tl.constexpr = 0):" in src
    assert "_inner(LG, BG, EK, T, H, Tp, C, BT, KB=KB)" in src
    probe = kernel_timeline.probe_kernel(kernel)
    assert probe.arg_names == ["PROBE"] + kernel.arg_names
    assert kernel_timeline.probe_kernel(kernel) is probe          # built once


@pytest.mark.skipif(not cuda_backend_available(),
                    reason="triton without its CUDA backend and ptxas")
def test_probe_wrapper_compiles_for_sm90():
    import torch

    import sm90_compile
    from retention.kernels.triton import rowwise

    f32 = torch.zeros(64, dtype=torch.float32)
    bound = dict(PROBE=torch.zeros(64, dtype=torch.int64), LG=f32, BG=f32, EK=f32, T=1000,
                 H=4, Tp=1024, C=256, BT=256, KB=64)
    probe = kernel_timeline.probe_kernel(rowwise._gate_cumsum)
    regs, spills, _, ttgir = sm90_compile.compile_launch(probe, bound, 4, 1, 90)
    assert spills == 0 and "globaltimer" in ttgir
