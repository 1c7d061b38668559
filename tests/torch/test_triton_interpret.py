"""The Triton kernels under TRITON_INTERPRET=1 on CPU (tiny float32 shapes), against the float64
attention form and the reference, forward and backward.

The interpreter must be switched on before triton is imported, so every check runs in a child
process (this file run as a script); the pytest process and the other torch tests never see
the variable. Run one check by hand: TRITON_INTERPRET=1 python tests/torch/test_triton_interpret.py fwd_bwd
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")


def _run_child(check: str, **extra_env) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1", **extra_env)
    proc = subprocess.run([sys.executable, __file__, check], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"{check} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert f"{check} passed" in proc.stdout


@pytest.mark.parametrize("check", ["fwd_bwd", "fwd_bwd_plain", "no_state_out", "chunk_48",
                                   "scan_widths", "pair_widths",
                                   "one_chunk", "one_chunk_row_factors",
                                   "one_chunk_state_out", "float16", "decode",
                                   "api", "checkpointed_compiled_layers", "batch_slices",
                                   "partial_outputs", "gate_sums"])
def test_triton_kernels_interpreted(check):
    _run_child(check)


@pytest.mark.parametrize("env", [
    {"RETENTION_TRITON_RECOMPUTE": "1"},                     # backward recomputes the states
    {"RETENTION_TRITON_SCAN_OPERAND": "a", "RETENTION_TRITON_SCAN_ROWS": "4"},
    {"RETENTION_TRITON_SCAN_ROWS": "1"},
    {"RETENTION_TRITON_SCAN_ROWS": "4"},                      # the d=128 forward's setting
    {"RETENTION_TRITON_SCAN_BV": "16"},                       # two value tiles per head
    {"RETENTION_TRITON_SCAN_PAIR": "0"},                      # one dot per row a
    {"RETENTION_TRITON_SCAN_ROWS": "4", "RETENTION_TRITON_SCAN_PAIR": "0"},
    {"RETENTION_TRITON_SCAN_TRANS": "0"},                     # [features, values] accumulators
    {"RETENTION_TRITON_SCAN_TRANS": "0", "RETENTION_TRITON_SCAN_OPERAND": "a"},
    {"RETENTION_TRITON_SCAN_VEC_COLS": "0"},                  # x_a columns one load each
    {"RETENTION_TRITON_DKV": "split"},                       # dv and dk in two launches
    {"RETENTION_TRITON_DKV": "joint"},                       # dv and dk in one pass
    {"RETENTION_TRITON_CHUNK_RANK1": "1"},                   # rank-one intra-chunk gate
    {"RETENTION_TRITON_CHUNK_RANK1": "1", "RETENTION_TRITON_DKV": "split"},
    {"RETENTION_TRITON_READ_PAIR": "1"},                     # state reads, rows a in pairs
    {"RETENTION_TRITON_STATE_GRAD": "fused"},   # dq, dk state terms in their kernels (these
    {"RETENTION_TRITON_STATE_GRAD": "fused", "RETENTION_TRITON_DKV": "split"},  # few heads split)
], ids=["recompute", "scan-operand-a-4-rows", "scan-1-row", "scan-4-rows", "scan-value-tiles",
        "scan-unpaired", "scan-unpaired-4-rows", "scan-untransposed",
        "scan-untransposed-operand-a", "scan-column-loads", "split-dkv", "joint-dkv",
        "rank-one-gate", "rank-one-gate-split-dkv", "read-paired", "state-grad-fused",
        "state-grad-fused-dkv-split"])
def test_triton_kernel_variants_interpreted(env):
    """The launch variants the GPU benchmark compares compute the same thing."""
    _run_child("fwd_bwd", **env)


@pytest.mark.parametrize("env", [
    {"RETENTION_TRITON_SCAN_ROWS_NARROW": "8"},
    {"RETENTION_TRITON_SCAN_ROWS_NARROW": "8", "RETENTION_TRITON_SCAN_VEC_COLS": "0",
     "RETENTION_TRITON_SCAN_PREFETCH": "0"},
], ids=["rows-in-8s", "rows-in-8s-single-loads"])
def test_scan_row_groups_interpreted(env):
    """The scan's rows a >= d/2 in programs of 8 (ops._row_group_narrow), rows in pairs,
    against the untransposed scan at d=64 and 128: their 8 columns x_a per token as one
    vector and the gates a step ahead (the GPU's defaults), or both loaded in their step."""
    _run_child("scan_widths", **env)


@pytest.mark.parametrize("env", [{"RETENTION_TRITON_ATTN_TRANS": "0"},
                                 {"RETENTION_TRITON_ATTN_SPLIT_DKV": "1"},
                                 {"RETENTION_TRITON_ATTN_MATCHED": "0"}],
                         ids=["transposed-loads", "split-dk-dv", "unmatched-summands"])
def test_one_chunk_variants_interpreted(env):
    """The one-chunk backward with its transposed operands loaded as such instead of
    tl.trans of the loaded tiles (ops.ATTN_TRANS), with dv and dk in two launches
    (ops.ATTN_SPLIT_DKV), and with dq's query factor applied after its sum instead of dq's
    and dk's summands from the same factors (ops.ATTN_MATCHED off)."""
    _run_child("one_chunk", **env)


# ---- the checks, run in the child process -------------------------------------------------

def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _case(B, T, Hq, H, d, gates, state, seed=0):
    import torch
    import torch.nn.functional as F

    from retention.kernels.triton.testing import attention_form

    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, h, d, generator=g) for h in (Hq, H, H))
    log_g = F.logsigmoid(2.0 + torch.randn(B, T, H, generator=g)) if gates else None
    S0 = None
    if state:   # the state a random prefix leaves, so z is consistent with S
        kp, vp = torch.randn(B, 20, H, d, generator=g), torch.randn(B, 20, H, d, generator=g)
        _, S0 = attention_form(q[:, :20].double(), kp.double(), vp.double())
        S0 = tuple(a.float() for a in S0)
    return q, k, v, log_g, S0


def _check_fwd_bwd(gates, state, Hq, H, chunk=32, state_out=True):
    """state_out False: no final state asked for (the kernels skip its stores), loss on y only."""
    import numpy as np
    import torch

    from retention import reference
    from retention.kernels.triton import ops
    from retention.kernels.triton.testing import attention_form

    ops.BLOCK_M = 16   # two row blocks per chunk of 32: covers the block loops
    B, T, d = 2, 50, 32   # T not a multiple of the chunk; d=32 has diagonal and off-diagonal tiles
    q, k, v, log_g, S0 = _case(B, T, Hq, H, d, gates, state)
    leaves = [a.clone().requires_grad_() for a in (q, k, v, log_g, *(S0 or ())) if a is not None]
    it = iter(leaves)
    qq, kk, vv = next(it), next(it), next(it)
    lg = next(it) if gates else None
    st = (next(it), next(it)) if state else None
    if state_out:
        y, (S, z) = ops.power_retention(qq, kk, vv, lg, chunk_size=chunk, initial_state=st,
                                        return_state=True)
    else:
        y = ops.power_retention(qq, kk, vv, lg, chunk_size=chunk, initial_state=st)
    # Forward against the float64 NumPy reference (chunked form, with state).
    ref_y, (ref_S, ref_z) = reference.power_retention(
        q.numpy(), k.numpy(), v.numpy(), None if log_g is None else log_g.numpy(), form="chunked",
        initial_state=None if S0 is None else tuple(a.numpy() for a in S0), return_state=True)
    outs = (("y", y, ref_y), ("S", S, ref_S), ("z", z, ref_z)) if state_out else (("y", y, ref_y),)
    for name, a, b in outs:
        err = _rel(a.detach(), torch.from_numpy(np.asarray(b)))
        assert err < 1e-5, (name, err)
    # Backward against autograd through the float64 attention form.
    gold_leaves = [a.detach().double().requires_grad_() for a in leaves]
    it = iter(gold_leaves)
    gq, gk, gv = next(it), next(it), next(it)
    glg = next(it) if gates else None
    gst = (next(it), next(it)) if state else None
    gy, (gS, gz) = attention_form(gq, gk, gv, glg, initial_state=gst)
    g = torch.Generator().manual_seed(1)
    wy, wS, wz = (torch.randn(a.shape, generator=g, dtype=torch.float64) for a in (gy, gS, gz))
    if state_out:
        torch.autograd.backward([y, S, z], [wy.float(), wS.float() * 1e-2, wz.float() * 1e-2])
        torch.autograd.backward([gy, gS, gz], [wy, wS * 1e-2, wz * 1e-2])
    else:
        y.backward(wy.float())
        gy.backward(wy)
    for a, b in zip(leaves, gold_leaves):
        assert a.grad is not None and torch.isfinite(a.grad).all()
        err = _rel(a.grad, b.grad)
        assert err < 1e-5, (tuple(a.shape), err)


def check_fwd_bwd():
    _check_fwd_bwd(gates=True, state=True, Hq=4, H=2)


def check_fwd_bwd_plain():
    _check_fwd_bwd(gates=False, state=False, Hq=2, H=2)


def check_no_state_out():
    """Training's call: no final state returned (its stores are skipped), initial state given."""
    _check_fwd_bwd(gates=True, state=True, Hq=4, H=2, state_out=False)


def check_chunk_48():
    """A chunk that is a multiple of 16 but not a power of two (16-token steps, 3 per chunk)."""
    _check_fwd_bwd(gates=True, state=True, Hq=2, H=1, chunk=48)


def check_scan_widths():
    """The transposed state scan's static paths by feature width (d=64: 64, 32, 16; d=128:
    128, 64, 32, 16; fwd_bwd's d=32 has 32 and 16) against the untransposed scan, both
    directions, per-chunk states and final state, with the per-token scale on either operand
    (ops.SCAN_BSIDE), and with the scale on operand b also with rows a in pairs (the bf16
    path on the GPU: ops._scan_pairs forced, as float32 operands at tf32 never pair there)."""
    import torch
    import triton.language as tl

    from retention.kernels.triton import launch, ops

    launched, fitted = set(), launch.fitted

    def recording(kernel, grid, *args, **kwargs):   # which row groups and pairs ran
        launched.add((kwargs["D_HEAD"], kwargs["TRANS"], kwargs["PAIR"], kwargs["AG"],
                      kwargs["AGN"]))
        return fitted(kernel, grid, *args, **kwargs)

    launch.fitted = recording
    g = torch.Generator().manual_seed(0)
    B, T, H, Hq, C = 1, 32, 1, 2, 16
    for d in (64, 128):
        k, v = torch.randn(B, T, H, d, generator=g), torch.randn(B, T, H, d, generator=g)
        q, dy = torch.randn(B, T, Hq, d, generator=g), torch.randn(B, T, Hq, d, generator=g)
        bg = -torch.rand(B * H, T, generator=g).cumsum(-1) * 0.1
        den, delta = torch.rand(B * Hq, T, generator=g) + 1, torch.randn(B * Hq, T, generator=g)
        for reverse, bside in ((False, True), (True, True), (False, False), (True, False)):
            ops.SCAN_BSIDE = bside
            X, Y = (q, dy) if reverse else (k, v)
            outs = []
            for trans, pair in ((False, False), (True, False), (True, True)):
                if pair and not bside:
                    continue
                ops.SCAN_TRANS = trans
                ops._scan_pairs = lambda dt_tl, prec, pair=pair: pair
                outs.append(ops._state_scan(X, Y, bg, den if reverse else None,
                                            delta if reverse else None, None, None, C, T // C,
                                            T, H, Hq, 0.5, tl.float32, torch.float32, "tf32",
                                            reverse))
            for out in outs[1:]:
                for a, b in zip(out, outs[0]):
                    err = ((a - b).norm() / b.norm()).item()
                    assert err < 1e-6, (d, reverse, bside, err)
    narrow = int(os.environ.get("RETENTION_TRITON_SCAN_ROWS_NARROW", "4"))
    assert {(64, True, True, 4, narrow), (128, True, True, 4, narrow)} <= launched, launched


def check_pair_widths():
    """The row-block kernels' rows a in pairs at every block width (pair level 2: d=64's W=48
    as 32 + 64, d=128's 112, 96 and 80 in two or three parts; fwd_bwd's d=32 has only powers
    of two, where level 2 is level 1) against one dot per row (level 0): outputs and
    gradients, GQA, gates, state; level 0's outputs against the NumPy reference."""
    import numpy as np
    import torch

    from retention import reference
    from retention.kernels.triton import ops

    ops.BLOCK_M = 16
    for d in (64, 128):
        q, k, v, log_g, S0 = _case(1, 32, 2, 1, d, gates=True, state=True, seed=d)
        runs = []
        for level in (0, 2):
            ops.READ_PAIR = level
            leaves = [a.clone().requires_grad_() for a in (q, k, v, log_g, *S0)]
            y, (S, z) = ops.power_retention(*leaves[:4], chunk_size=16,
                                            initial_state=tuple(leaves[4:]), return_state=True)
            g = torch.Generator().manual_seed(1)
            torch.autograd.backward([y, S, z], [torch.randn(a.shape, generator=g)
                                                for a in (y, S, z)])
            runs.append([y, S, z] + [a.grad for a in leaves])
        ref = reference.power_retention(q.numpy(), k.numpy(), v.numpy(), log_g.numpy(),
                                        form="chunked", initial_state=tuple(a.numpy() for a in S0),
                                        return_state=True)
        for a, b in zip(runs[0][:3], (ref[0], *ref[1])):
            assert _rel(a.detach(), torch.from_numpy(np.asarray(b))) < 1e-5, d
        for a, b in zip(*runs):
            err = _rel(b.detach(), a.detach())
            assert err < 1e-5, (d, tuple(a.shape), err)


def check_one_chunk():
    """Training's call on a sequence within one chunk (the default chunk up to
    ops.QUADRATIC_MAX): no state is built or read, the plain attention form."""
    import torch

    from retention.kernels.triton import ops

    assert ops.default_chunk(50) == 64 and ops._stateless(1, None, False)
    # Small blocks so T=50 has blocks before the diagonal, two steps inside each diagonal
    # block and a partial last block (the GPU's are 64-128 rows).
    small = {kind: (32, 16, 4, 1) for kind in ("fwd", "dq", "dkv", "dv", "dk")}
    ops.ATTN_BLOCKS = {kind: {32: cfg} for kind, cfg in small.items()}
    _check_fwd_bwd(gates=True, state=False, Hq=4, H=2, chunk=None, state_out=False)
    ops.ATTN_BLOCKS = {kind: {32: (16, 16, 4, 1)} for kind in small}
    _check_fwd_bwd(gates=True, state=False, Hq=2, H=2, chunk=None, state_out=False)
    # dq's 32-row blocks over dk/dv's 16-query ones: with ATTN_MATCHED, dk/dv splits the gate
    # at the first row of dq's block, not its own (ops._matched_blocks)
    ops.ATTN_BLOCKS = {kind: {32: (32, 32, 4, 1)} for kind in small}
    ops.ATTN_BLOCKS["dkv"] = ops.ATTN_BLOCKS["dv"] = ops.ATTN_BLOCKS["dk"] = {32: (32, 16, 4, 1)}
    assert ops._matched_blocks(32, ops._dot_types(torch.float32)[0]) == (
        32 if ops.ATTN_MATCHED else 0)
    _check_fwd_bwd(gates=True, state=False, Hq=4, H=2, chunk=None, state_out=False)


def check_one_chunk_row_factors():
    """What the one-chunk dq launch writes for the dk/dv launch, per query row: delta = dy.y,
    1/den and the gate factor e^{b_i - b_Q}/den_i (Q the first row of i's block: dq's with
    the matched summands, else dk/dv's query block), zeros past T, on every row of dq's
    blocks; and the gates' key factors e^{b_R - b_j} (R the last key of j's block)."""
    import torch
    import torch.nn.functional as F

    from retention.kernels.triton import ops

    g = torch.Generator().manual_seed(3)
    B, T, Hq, H, d = 2, 50, 4, 2, 32
    q, k, v, dy = (torch.randn(B, T, h, d, generator=g) for h in (Hq, H, H, Hq))
    log_g = F.logsigmoid(2.0 + torch.randn(B, T, H, generator=g))
    for matched in (True, False):
        ops.ATTN_MATCHED = matched
        # dq's 32 x 32 blocks over dk/dv's 16-query ones (ops._matched_blocks)
        ops.ATTN_BLOCKS = {"fwd": {32: (32, 16, 4, 1)}, "dq": {32: (32, 32, 4, 1)},
                           "dkv": {32: (32, 16, 4, 1)}}
        assert ops._matched_blocks(32, ops._dot_types(q.dtype)[0]) == (32 if matched else 0)
        y, den = torch.ops.retention.triton_power_retention_fwd(
            q, k, v, log_g, None, None, d ** -0.5, 64, True, False)[:2]
        outs = [torch.empty_like(a) for a in (q, k, v)]
        sums = torch.empty(B, Hq, T), torch.empty(B, H, T)
        dt_tl, _, prec = ops._dot_types(q.dtype)
        delta, rden, cq = ops._attention_bwd(q, k, v, log_g, dy, y, den, *outs, *sums,
                                             d ** -0.5, dt_tl, prec)
        Tp = ops._attn_len(T)
        rows = 64                                          # dq's blocks of 32 cover 64 rows
        bg, ek = ops._chunk_gates(log_g, Tp, 1, key_block=32)   # dq's key blocks
        block = 32 if matched else 16                      # dq's rows, else dk/dv's queries
        i = torch.arange(rows)
        first = (i // block) * block
        want_delta = torch.zeros(B * Hq, rows)
        want_delta[:, :T] = (dy * y).sum(-1).permute(0, 2, 1).reshape(B * Hq, T)
        want_rden = torch.zeros(B * Hq, rows)
        want_rden[:, :T] = 1 / den.reshape(B * Hq, T)
        kv = (torch.arange(B * Hq) // Hq) * H + (torch.arange(B * Hq) % Hq) // (Hq // H)
        want_cq = want_rden * torch.exp(bg[kv][:, i] - bg[kv][:, first])
        for got, want in ((delta, want_delta), (rden, want_rden), (cq, want_cq)):
            assert torch.allclose(got[:, :rows], want, rtol=1e-5, atol=1e-6), matched
        last = (i // 32) * 32 + 31
        assert torch.allclose(ek[:, :rows], torch.exp(bg[:, last] - bg[:, :rows]), rtol=1e-5)
        assert (ek <= 1).all()


def check_one_chunk_state_out():
    """One chunk with the final state asked for (prefill): the state path runs."""
    _check_fwd_bwd(gates=True, state=False, Hq=4, H=2, chunk=None, state_out=True)


def check_float16():
    import torch

    from retention.kernels.triton import power_retention
    from retention.kernels.triton.testing import attention_form

    q, k, v, log_g, _ = _case(1, 40, 2, 1, 16, True, False)
    q16, k16, v16 = (a.half() for a in (q, k, v))
    y = power_retention(q16, k16, v16, log_g, chunk_size=16)
    assert y.dtype == torch.float16
    gold, _ = attention_form(q16.double(), k16.double(), v16.double(), log_g.double())
    assert _rel(y, gold) < 3e-3


def check_decode():
    from retention.kernels.triton import power_retention, power_retention_step
    from retention.kernels.triton.testing import attention_form

    q, k, v, log_g, _ = _case(2, 12, 4, 2, 32, True, False)
    gold_y, (gold_S, gold_z) = attention_form(q.double(), k.double(), v.double(), log_g.double())
    # Prefill 9 tokens with the chunked kernel, then decode 3: the full forward's outputs.
    _, state = power_retention(q[:, :9], k[:, :9], v[:, :9], log_g[:, :9], chunk_size=16,
                               return_state=True)
    for t in range(9, 12):
        y, state = power_retention_step(q[:, t], k[:, t], v[:, t], log_g[:, t], state)
        assert _rel(y, gold_y[:, t]) < 1e-5
    assert _rel(state[0], gold_S) < 1e-5 and _rel(state[1], gold_z) < 1e-5
    # An empty state and no gate: the first token's output is its own value.
    y, _ = power_retention_step(q[:, 0], k[:, 0], v[:, 0], None, None)
    assert _rel(y, v[:, 0].repeat_interleave(2, dim=1)) < 1e-4   # features cancel: f32 rounding


def check_api():
    import torch

    import retention.kernels.triton as kt

    ok, why = kt.available()
    assert ok and "interpreter" in why
    q, k, v, _, _ = _case(1, 8, 2, 1, 16, False, False)
    for bad, exc in (((q, k[:, :4], v), ValueError), ((q[..., :8], k[..., :8], v[..., :8]),
                                                      NotImplementedError)):
        with pytest.raises(exc):
            kt.power_retention(*bad)
    with pytest.raises(NotImplementedError):
        kt.power_retention(q, k, v, degree=4)
    # The custom op's fake kernel gives the shapes torch.compile traces with.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(a) for a in (q, k, v))
        y, (S, z) = kt.power_retention(fq, fk, fv, return_state=True)
        assert y.shape == q.shape and S.shape == (1, 1, math.comb(17, 2), 16)
        assert z.shape == (1, 1, math.comb(17, 2)) and S.dtype == torch.float32
    # torch.compile(fullgraph=True) traces the ops through their fake and autograd
    # registrations (aot_eager: the AOT autograd graph, no C++ compiler needed); the
    # compiled loss and gradients equal the eager ones.
    lg = torch.nn.functional.logsigmoid(torch.randn(1, 8, 1) + 2.0)
    leaves = [a.clone().requires_grad_() for a in (q, k, v, lg)]

    def loss(q, k, v, lg):
        y, (S, z) = kt.power_retention(q, k, v, lg, chunk_size=16, return_state=True)
        return (y * y).sum() + 1e-2 * S.sum() + 1e-2 * z.sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = compiled(*leaves)
    got_grads = torch.autograd.grad(got, leaves)
    want = loss(*leaves)
    want_grads = torch.autograd.grad(want, leaves)
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(got_grads, want_grads))

    def loss_y(q, k, v, lg):   # no state output: the op's placeholders trace too
        return (kt.power_retention(q, k, v, lg, chunk_size=16) ** 2).sum()

    got = torch.compile(loss_y, fullgraph=True, backend="aot_eager")(*leaves)
    assert torch.equal(got, loss_y(*leaves))
    assert all(torch.equal(a, b) for a, b in zip(
        torch.autograd.grad(got, leaves), torch.autograd.grad(loss_y(*leaves), leaves)))
    # A forward-only call (prefill) reads grad mode and requires_grad to pick its chunk:
    # traced whole too.
    prefill = lambda q, k, v, lg: kt.power_retention(q, k, v, lg, return_state=True)
    with torch.no_grad():
        got_y, (got_S, _) = torch.compile(prefill, fullgraph=True, backend="aot_eager")(*leaves)
        want_y, (want_S, _) = prefill(*leaves)
    assert torch.equal(got_y, want_y) and torch.equal(got_S, want_S)


def check_partial_outputs():
    """Losses on part of the outputs (y alone with the state returned; S alone, y unused)
    match autograd through the float64 attention form, and the outputs nobody differentiates
    get no zero-filled gradient: at 64k x 16 heads the per-chunk states' would be 1.3 GB
    allocated and written on every backward."""
    from torch.profiler import ProfilerActivity, profile

    from retention.kernels.triton import ops
    from retention.kernels.triton.testing import attention_form

    B, T, d, chunk = 1, 40, 16, 16
    q, k, v, log_g, _ = _case(B, T, 2, 1, d, True, False)
    states_shape = [B, -(-T // chunk), ops.internal_dim(d), d]   # [B*H, chunks, D_int, d]
    for use in ("y", "S"):
        leaves = [a.clone().requires_grad_() for a in (q, k, v, log_g)]
        gold = [a.detach().double().requires_grad_() for a in leaves]
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            y, (S, z) = ops.power_retention(*leaves, chunk_size=chunk, return_state=True)
            (y.sum() if use == "y" else S.sum()).backward()
        gy, (gS, _) = attention_form(*gold)
        (gy.sum() if use == "y" else gS.sum()).backward()
        for a, b in zip(leaves, gold):
            if b.grad is None:   # S does not depend on q
                assert a.grad is None or not a.grad.any(), use
                continue
            assert _rel(a.grad, b.grad) < 1e-5, (use, tuple(a.shape), _rel(a.grad, b.grad))
        fills = [e.input_shapes for e in prof.key_averages(group_by_input_shape=True)
                 if e.key in ("aten::zero_", "aten::fill_")]
        assert not any(shapes and list(shapes[0]) == states_shape for shapes in fills), fills


def check_batch_slices():
    """More (batch x query heads) than the launch grid's second axis takes (ops.MAX_GRID_Y,
    65,535 on CUDA; 4 here): the batch runs in slices, with the same outputs, final states and
    gradients as one call, bit for bit."""
    import torch

    from retention.kernels.triton import ops

    q, k, v, log_g, S0 = _case(5, 20, 2, 1, 16, True, True)

    def run(grid_y):
        ops.MAX_GRID_Y = grid_y
        leaves = [a.clone().requires_grad_() for a in (q, k, v, log_g, *S0)]
        y, (S, z) = ops.power_retention(*leaves[:4], chunk_size=16,
                                        initial_state=tuple(leaves[4:]), return_state=True)
        (y.sum() + S.square().sum() + z.sum()).backward()
        return [y, S, z] + [a.grad for a in leaves]

    whole, sliced = run(65535), run(4)   # 4 // 2 heads: slices of 2, 2 and 1 sequences
    assert all(torch.equal(a, b) for a, b in zip(whole, sliced))
    ops.MAX_GRID_Y = 4
    y = ops.power_retention(q, k, v, None)   # no gate, no state: the training call
    ops.MAX_GRID_Y = 65535
    assert torch.equal(y, ops.power_retention(q, k, v, None))


def check_checkpointed_compiled_layers():
    """The kernel path inside activation checkpointing + per-layer torch.compile traces
    whole (test_layer_wrapping.py; on CUDA a graph break there silently runs eager)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_layer_wrapping import check_layers_trace_whole

    check_layers_trace_whole("kernel")


def check_gate_sums():
    """The gates' per-chunk cumulative sums and the log-gate gradient's reversed one
    (rowwise._gate_cumsum, _gate_grad) over several of their blocks, against torch: chunk
    sums restart at each chunk, carry across blocks within one, pad with zeros past T; the
    gradient sums the group's q.dq, adds the final state's term at the last step only, and
    its spans start from the sum of the terms after them."""
    import torch

    from retention.kernels.triton import ops, rowwise

    g = torch.Generator().manual_seed(0)
    B, T, H, RG = 2, 2500, 3, 2
    log_g = -torch.rand(B, T, H, generator=g)
    for chunk, n in ((2560, 1), (1152, 3), (48, 53)):   # 5, 9 and 1 blocks per chunk
        padded = torch.cat([log_g, log_g.new_zeros(B, n * chunk - T, H)], 1)
        want = padded.permute(0, 2, 1).reshape(B * H, n, chunk).cumsum(-1).reshape(B * H, -1)
        got = ops._chunk_gates(log_g, chunk, n)
        assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-5, atol=1e-4), chunk
    # with the key factors e^{b_R - b_j} of 64-key blocks (R the block's last key), over
    # five 512-wide tiles: the same sums, and each factor from its own block
    got, ek = ops._chunk_gates(log_g, 2560, 1, key_block=64)
    assert torch.equal(got, ops._chunk_gates(log_g, 2560, 1))
    arg = got.view(B * H, -1, 64)[..., -1:] - got.view(B * H, -1, 64)   # b_R - b_j
    # b reaches ~1,250 here, so the exponent is good to a float32 ulp of b (1.2e-4), not to
    # rtol 1e-5: one interpreter run in several gave factors 1.5e-4 off exp(b_R - b_j)
    tol = 4 * torch.finfo(torch.float32).eps * float(got.abs().max())
    assert (torch.log(ek.view_as(arg)) - arg).abs().max() <= tol
    qdq = torch.randn(B, H * RG, T, generator=g)
    kdk = torch.randn(B, H, T, generator=g)
    last = torch.randn(B, H, generator=g)
    for lt in (None, last):
        dG = 0.5 * (qdq.view(B, H, RG, T).sum(2) - kdk)
        if lt is not None:
            dG[:, :, -1] += lt
        want = dG.flip(-1).cumsum(-1).flip(-1).transpose(1, 2)
        got = ops._log_gate_grad(qdq, kdk, lt)
        assert got.shape == (B, T, H) and torch.allclose(got, want, rtol=1e-5, atol=1e-3)
        # spans of 4 blocks each, the last span and its first block partial
        got = torch.empty(B, T, H)
        rowwise._gate_grad[(B * H, 3)](qdq, kdk, kdk if lt is None else lt, got, T, H, RG=RG,
                                       BT=256, CT=1024, HAS_LAST=lt is not None)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-3)


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    name = sys.argv[1]
    globals()[f"check_{name}"]()
    print(f"{name} passed")
