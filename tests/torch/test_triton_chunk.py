"""Which chunk the Triton kernels run (no kernel launch)."""
import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")

from retention.kernels.triton.ops import kernel_chunk  # noqa: E402


def test_chunk_size_then_default(monkeypatch):
    monkeypatch.delenv("RETENTION_TRITON_CHUNK", raising=False)
    assert kernel_chunk(65536, 128) == 128          # an explicit chunk is honoured
    assert kernel_chunk(65536, None) == 256
    assert kernel_chunk(50, None) == 64


def test_forward_only_calls_take_longer_chunks(monkeypatch):
    """Prefill and evaluation (no gradient wanted) run ops.FORWARD_CHUNK where it was timed
    faster (d=64 and 128), short sequences still one chunk when stateless."""
    for name in ("RETENTION_TRITON_CHUNK", "RETENTION_TRITON_FORWARD_CHUNK",
                 "RETENTION_TRITON_QUADRATIC_MAX"):
        monkeypatch.delenv(name, raising=False)
    assert kernel_chunk(65536, None, 64, forward_only=True) == 512
    assert kernel_chunk(65536, None, 128, forward_only=True) == 512
    assert kernel_chunk(65536, None, 32, forward_only=True) == 256
    assert kernel_chunk(1500, None, 64, stateless=False, forward_only=True) == 512
    assert kernel_chunk(300, None, 64, stateless=False, forward_only=True) == 512
    assert kernel_chunk(200, None, 64, stateless=False, forward_only=True) == 256
    assert kernel_chunk(4096, None, 64, forward_only=True) == 4096      # one chunk, no state
    assert kernel_chunk(65536, 128, 64, forward_only=True) == 128       # explicit chunk wins
    monkeypatch.setenv("RETENTION_TRITON_FORWARD_CHUNK", "256")
    assert kernel_chunk(65536, None, 64, forward_only=True) == 256
    assert kernel_chunk(65536, None, 64) == 256


def test_environment_overrides_chunk_size(monkeypatch):
    monkeypatch.setenv("RETENTION_TRITON_CHUNK", "512")
    assert kernel_chunk(65536, 128) == 512
    assert kernel_chunk(100, None) == 512


def test_short_sequences_run_as_one_chunk(monkeypatch):
    """Up to ops.QUADRATIC_MAX[d] the default is one chunk (a multiple of 64): the plain
    attention form, no states; beyond it 256-token chunks."""
    monkeypatch.delenv("RETENTION_TRITON_CHUNK", raising=False)
    monkeypatch.delenv("RETENTION_TRITON_QUADRATIC_MAX", raising=False)
    assert kernel_chunk(1000, None, 64) == 1024
    assert kernel_chunk(6000, None, 64) == 6016
    assert kernel_chunk(8192, None, 64) == 8192
    assert kernel_chunk(8193, None, 64) == 256
    assert kernel_chunk(300, None, 32) == 320
    assert kernel_chunk(8192, None, 32) == 256
    assert kernel_chunk(32768, None, 128) == 32768
    # Prefill or a continued state needs the scan anyway: chunks, as for long sequences.
    assert kernel_chunk(1000, None, 64, stateless=False) == 256
    monkeypatch.setenv("RETENTION_TRITON_QUADRATIC_MAX", "0")   # off: chunks everywhere
    assert kernel_chunk(1000, None, 64) == 256


def test_launch_knobs_defaults_and_bad_values(monkeypatch):
    """The dk/dv launch, the scan's value tile, warps and orientation and dq's side stream:
    defaults by head dim, and a bad setting is an error naming the variable, not a silent
    fallback."""
    import os
    import subprocess
    import sys

    from retention.kernels.triton import ops

    monkeypatch.delenv("RETENTION_TRITON_SCAN_BV", raising=False)
    assert (ops._scan_values(32), ops._scan_values(64), ops._scan_values(128)) == (32, 64, 64)
    monkeypatch.setenv("RETENTION_TRITON_SCAN_BV", "32")
    assert ops._scan_values(64) == 32
    for bad in ("48", "64"):
        monkeypatch.setenv("RETENTION_TRITON_SCAN_BV", bad)
        with pytest.raises(ValueError, match="RETENTION_TRITON_SCAN_BV"):
            ops._scan_values(32)
    if "RETENTION_TRITON_DKV" not in os.environ:
        assert ops.DKV_LAUNCH == {16: "sequential", 32: "sequential", 64: "sequential",
                                  128: "split"}
    monkeypatch.delenv("RETENTION_TRITON_SCAN_WARPS", raising=False)
    assert [ops._scan_warps(d) for d in (16, 32, 64, 128)] == [4, 4, 4, 8]
    monkeypatch.setenv("RETENTION_TRITON_SCAN_WARPS", "8")
    assert ops._scan_warps(64) == 8
    monkeypatch.setenv("RETENTION_TRITON_SCAN_WARPS", "2")
    with pytest.raises(ValueError, match="RETENTION_TRITON_SCAN_WARPS must be 4 or 8"):
        ops._scan_warps(64)
    if "RETENTION_TRITON_SCAN_TRANS" not in os.environ:
        assert ops.SCAN_TRANS
    monkeypatch.delenv("RETENTION_TRITON_SCAN_ROWS", raising=False)
    # 4 rows per scan program at d=128 (in the reverse scan only with rows in pairs) and at
    # d=64 with the transposed scan and rows in pairs
    assert [ops._row_group(128), ops._row_group(128, True), ops._row_group(128, True, False),
            ops._row_group(64), ops._row_group(64, True), ops._row_group(64, True, False),
            ops._row_group(64, trans=False), ops._row_group(32)] == [4, 4, 2, 4, 4, 2, 2, 2]
    # rows a in pairs in the state reads, as timed: with bf16 operands, level 2 (every W) in
    # the forward's at d=64 and everywhere at d=128, level 1 (powers of two) in dv's at d=64,
    # none at d=32 or with float32 operands; the environment's level overrides every kernel
    import triton.language as tl
    monkeypatch.setattr(ops, "READ_PAIR", None)
    levels = lambda d, dt: [ops._read_pair(d, dt, "out"), ops._read_pair(d, dt, "dkv")]
    assert levels(64, tl.bfloat16) == [2, 1]
    assert levels(128, tl.bfloat16) == [2, 2]
    assert levels(32, tl.bfloat16) == levels(64, tl.float32) == levels(128, tl.float16) == \
        [0, 0]
    # untimed off Hopper (sm_80: ten times the spills at d=128)
    assert [ops._read_pair(128, tl.bfloat16, "out", 8),
            ops._read_pair(64, tl.bfloat16, "dkv", 10)] == [0, 0]
    import torch
    assert ops._major(torch.device("cpu")) == ops.OFF_CUDA_MAJOR == 9
    monkeypatch.setattr(ops, "READ_PAIR", 1)
    assert levels(64, tl.float32) == [1, 1]
    # dq's and dk's state terms in their own launch at d=128 and for few sequences x KV heads
    monkeypatch.setattr(ops, "STATE_GRAD", None)
    assert [ops._split_state_grad(128, 256), ops._split_state_grad(64, 16),
            ops._split_state_grad(64, 64), ops._split_state_grad(32, 32)] == \
        [True, True, False, True]
    monkeypatch.setattr(ops, "STATE_GRAD", "fused")
    assert not ops._split_state_grad(128, 1)
    # dq's side stream: on by default, never off CUDA (no stream on a CPU tensor's device)
    if "RETENTION_TRITON_OVERLAP_DQ" not in os.environ:
        assert ops.OVERLAP_DQ
    assert ops._side_stream(torch.device("cpu")) is None
    for name, bad, says in (("RETENTION_TRITON_DKV", "both", "must be one of"),
                            ("RETENTION_TRITON_SCAN_PAIR", "yes", "must be 0 or 1"),
                            ("RETENTION_TRITON_SCAN_TRANS", "yes", "must be 0 or 1"),
                            ("RETENTION_TRITON_READ_PAIR", "3", "must be 0, 1 or 2"),
                            ("RETENTION_TRITON_STATE_GRAD", "both", "must be fused or split"),
                            ("RETENTION_TRITON_OVERLAP_DQ", "on", "must be 0 or 1")):
        proc = subprocess.run([sys.executable, "-c", "import retention.kernels.triton.ops"],
                              env=dict(os.environ, **{name: bad}),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and f"{name} {says}" in proc.stderr, proc.stderr[-500:]


def test_scan_stages_and_row_groups(monkeypatch):
    """The state scan's pipeline stages and its rows per program for the rows a >= d/2, as
    timed: 3 stages and 8 such rows at d=64 and 128 with bf16 operands on Hopper, except 8
    rows in a forward scan whose rows' programs fit in one wave of two per multiprocessor;
    the others' own settings elsewhere; the environment overrides, and a bad value names its
    variable."""
    import triton.language as tl

    from retention.kernels.triton import ops

    for name in ("RETENTION_TRITON_SCAN_STAGES", "RETENTION_TRITON_SCAN_STEP",
                 "RETENTION_TRITON_SCAN_ROWS_NARROW"):
        monkeypatch.delenv(name, raising=False)
    bf16, f32 = tl.bfloat16, tl.float32
    assert [ops._scan_step(256, 64, bf16, 9), ops._scan_step(256, 64, bf16, 9, True),
            ops._scan_step(256, 128, bf16, 9), ops._scan_step(256, 32, bf16, 9),
            ops._scan_step(256, 64, f32, 9), ops._scan_step(256, 64, bf16, 8),
            ops._scan_step(48, 64, bf16, 9)] == \
        [(128, 3), (128, 3), (64, 3), (128, 2), (128, 2), (128, 2), (16, 3)]
    monkeypatch.setenv("RETENTION_TRITON_SCAN_STAGES", "4:2")
    monkeypatch.setenv("RETENTION_TRITON_SCAN_STEP", "64")
    assert [ops._scan_step(256, 64, f32, 9), ops._scan_step(256, 64, f32, 9, True)] == \
        [(64, 4), (64, 2)]
    monkeypatch.setenv("RETENTION_TRITON_SCAN_STAGES", "1")
    assert ops._scan_step(256, 128, bf16, 9, True) == (64, 1)
    for bad in ("5", "3,2", "3:2:1", "x"):
        monkeypatch.setenv("RETENTION_TRITON_SCAN_STAGES", bad)
        with pytest.raises(ValueError, match="RETENTION_TRITON_SCAN_STAGES"):
            ops._scan_step(256, 64, bf16, 9)

    # (d, ag, dt, major, paired, trans, reverse, batch x KV heads x value tiles, SMs)
    narrow = ops._row_group_narrow
    assert [narrow(64, 4, bf16, 9, True, True, False, 64, 132),   # 16k: 1,024 row programs
            narrow(64, 4, bf16, 9, True, True, True, 16, 132),    # 64k, reverse
            narrow(64, 4, bf16, 9, True, True, False, 16, 132),   # 64k: 256, one wave
            narrow(64, 4, bf16, 9, True, True, False, 17, 132),   # 272: more than one
            narrow(128, 4, bf16, 9, True, True, False, 32, 132),  # 1,024
            narrow(64, 4, f32, 9, True, True, True, 64, 132),
            narrow(64, 4, bf16, 8, True, True, True, 64, 108),
            narrow(32, 2, bf16, 9, True, True, True, 64, 132),
            narrow(64, 4, bf16, 9, True, False, True, 64, 132)] == [8, 8, 4, 8, 8, 4, 4, 2, 4]
    monkeypatch.setenv("RETENTION_TRITON_SCAN_ROWS_NARROW", "8")
    assert [narrow(32, 2, f32, 9, True, True, False, 1, 132),     # forced: d/2 = 16 rows
            narrow(32, 2, f32, 9, False, True, False, 1, 132),    # 8 needs pairs
            narrow(16, 2, f32, 9, True, True, False, 1, 132),     # d=16: no narrow rows
            narrow(64, 4, f32, 9, True, False, False, 1, 132)] == [8, 2, 2, 4]
    monkeypatch.setenv("RETENTION_TRITON_SCAN_ROWS_NARROW", "16")
    with pytest.raises(ValueError, match="RETENTION_TRITON_SCAN_ROWS_NARROW"):
        narrow(64, 4, bf16, 9, True, True, False, 64, 132)


class _Stop(Exception):
    pass


def test_forward_only_follows_grad_mode(monkeypatch):
    """power_retention asks for the forward-only chunk exactly when nothing wants a gradient
    (no input requires one, or grad mode is off): stopped before any launch."""
    import torch

    from retention.kernels.triton import ops

    seen = []

    def spy(T, chunk_size, d=64, stateless=True, forward_only=False):
        seen.append(forward_only)
        raise _Stop

    monkeypatch.setattr(ops, "kernel_chunk", spy)
    q, k, v = (torch.randn(1, 8, 2, 16) for _ in range(3))
    S0, z0 = torch.zeros(1, 2, 136, 16), torch.zeros(1, 2, 136)
    calls = [
        lambda: ops.power_retention(q, k, v),
        lambda: ops.power_retention(q.clone().requires_grad_(), k, v),
        lambda: ops.power_retention(q, k, v, torch.zeros(1, 8, 2).requires_grad_()),
        lambda: ops.power_retention(q, k, v, initial_state=(S0.clone().requires_grad_(), z0)),
    ]
    for call in calls:
        with pytest.raises(_Stop):
            call()
    with torch.no_grad(), pytest.raises(_Stop):
        ops.power_retention(q.clone().requires_grad_(), k, v)
    assert seen == [True, False, False, False, True]
