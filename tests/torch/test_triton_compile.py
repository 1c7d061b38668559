"""Every Triton launch of the kernels' calls compiles for an H100/H200 (sm_90a) through ptxas,
without a GPU (benchmarks/sm90_compile.py): the interpreter runs kernels the GPU compiler
rejects (a static branch returning two shapes passed it), so this is CI's compile check.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("torch")
triton = pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from sm90_compile import cuda_backend_available  # noqa: E402


def _compile(tmp_path, *args):
    env = {k: v for k, v in os.environ.items()
           if k != "TRITON_INTERPRET" and not k.startswith("RETENTION_TRITON_")}
    env["TRITON_CACHE_DIR"] = str(tmp_path)   # compile for real, not from an earlier cache
    return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "sm90_compile.py"),
                           *args], env=env, capture_output=True, text=True, timeout=900)


needs_backend = pytest.mark.skipif(not cuda_backend_available(),
                                   reason="triton without its CUDA backend and ptxas")


@needs_backend
def test_every_launch_compiles_for_sm90(tmp_path):
    proc = _compile(tmp_path, "--dtypes", "bfloat16", "float16", "--dims", "64", "128",
                    "--waits")
    out = proc.stdout
    assert proc.returncode == 0 and "FAIL" not in out, out[-3000:] + proc.stderr[-3000:]
    # (kernel, its settings and warps) from each line: name, warps, stages, ..., KEY=VALUE
    launches = [(line.split()[0], dict((f.split("=") for f in line.split() if "=" in f),
                                       warps=line.split()[1], stages=line.split()[2]))
                for line in out.splitlines() if line.startswith("_")]
    scans = [c for name, c in launches if name == "_state_scan"]
    # The defaults: the scan's rows in pairs for bf16, never for fp16 (float32 operands at
    # tf32: triton 3.6 fails to compile that dot paired); 4 rows per program when paired (at
    # d=128 also the unpaired forward); accumulators transposed for both; dk/dv "sequential"
    # (PART 3) below d=128 and split in two launches at 128.
    assert {(c["D_HEAD"], c["DT"], c["PAIR"], c["AG"], c["TRANS"]) for c in scans} == {
        ("64", "bf16", "True", "4", "True"), ("128", "bf16", "True", "4", "True"),
        ("64", "fp32", "False", "2", "True"), ("128", "fp32", "False", "4", "True"),
        ("128", "fp32", "False", "2", "True")}
    # 4 warps per scan program up to d=64 (one warpgroup reads y^T once), 8 at d=128.
    assert {(c["warps"], c["D_HEAD"]) for c in scans} == {("4", "64"), ("8", "128")}
    # bf16: 3 stages (at d=64 two programs per multiprocessor still fit), and the rows a >=
    # d/2 in programs of 8 in the reverse scan (the forward keeps 4 when its programs fit in
    # one wave, as these small calls' do).
    assert {(c["D_HEAD"], c["REVERSE"], c["AGN"], c["stages"]) for c in scans
            if c["DT"] == "bf16"} == {("64", "False", "4", "3"), ("64", "True", "8", "3"),
                                      ("128", "False", "4", "3"), ("128", "True", "8", "3")}
    parts = {(c["D_HEAD"], c["PART"]) for name, c in launches
             if name == "_dkv_bwd" and c["DT"] == "bf16"}
    assert parts == {("64", "3"), ("128", "1"), ("128", "2")}
    # Rows a in pairs in the state reads (ops._read_pair) with bf16 operands only: level 2 in
    # the forward's at d=64 and in both at d=128, 1 in dv's at d=64.
    levels = {(name, c["D_HEAD"], c["DT"], c.get("READ_PAIR"))
              for name, c in launches if name in ("_out_fwd", "_dkv_bwd")}
    assert {lv for lv in levels if lv[3] not in (None, "0")} == {
        ("_out_fwd", "64", "bf16", "2"), ("_dkv_bwd", "64", "bf16", "1"),
        ("_out_fwd", "128", "bf16", "2"), ("_dkv_bwd", "128", "bf16", "2")}
    assert {"_state_scan", "_out_fwd", "_dq_bwd", "_dkv_bwd", "_attn_fwd", "_attn_dq",
            "_attn_dkv", "_row_delta", "_step", "_ce_fwd", "_ce_bwd"} <= {n for n, _ in launches}
    # The forward's state read keeps its wgmmas in flight (each column part of a block on its
    # own accumulator): only the intra-chunk scores are waited on at once, where a chain
    # across the parts made it 2 at d=64 and 10 at d=128 (triton 3.9).
    waited = [int(re.search(r"waited on at once (\d+)", line).group(1))
              for line in out.splitlines() if line.startswith("_out_fwd") and "DT=bf16" in line]
    assert waited == [1, 1], waited


@needs_backend
def test_float32_attention_fits_an_a100(tmp_path):
    """float32 inputs at d=128 in one chunk: the 128-row dq block needed 192 KB of shared
    memory even at one stage, more than an A100's 163 KB (ops.ATTN_BLOCKS_F32 fixes it)."""
    proc = _compile(tmp_path, "--arch", "80", "--dtypes", "float32", "--dims", "128",
                    "--only", "_attn")
    assert proc.returncode == 0 and "all 3 launches compiled" in proc.stdout, \
        proc.stdout[-3000:] + proc.stderr[-3000:]
