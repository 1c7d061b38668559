"""torch.library custom ops around the Triton kernels, so torch.compile(fullgraph=True) keeps
them in the graph: chunked forward, its backward (a second op, so compiled backward graphs see
it too) and the decode step. Legend: B batch, T time, Hq query heads, H KV heads, d head dim,
D canonical features (C(d+1, 2)), Di internal features (layout.py), N chunks.
"""
from __future__ import annotations

import contextlib
import math
import os
from functools import lru_cache
from typing import Optional

import numpy as np
import torch
import triton
import triton.language as tl

from . import attention, chunked, decode, launch, rowwise
from .layout import internal_dim, to_canonical, to_internal


def _env_flag(name: str, default: bool) -> bool:
    """A 0/1 switch from the environment; anything else is an error naming the variable."""
    value = os.environ.get(name, "1" if default else "0")
    if value not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


def _env_choice(name: str, choices: tuple[int, ...]) -> Optional[int]:
    """An integer setting from the environment (None when unset), one of choices."""
    value = os.environ.get(name)
    if value and value not in {str(c) for c in choices}:
        *head, last = map(str, choices)
        raise ValueError(f"{name} must be {', '.join(head)} or {last}, got {value!r}")
    return int(value) if value else None


BLOCK_M = 64        # rows per program; the interpreter tests shrink it to cover several blocks
MAX_CHUNK = 256     # default chunk: state traffic falls with the chunk, intra-chunk work grows
# The chunk of a forward-only call (nothing wants a gradient: prefill, evaluation) by head
# dim. Without the backward, which redoes the intra-chunk part in dq and dk/dv, a longer chunk
# pays: half the scan's chunk boundaries and stored states. Forward ms at 512 against 256
# (H200, bf16, 65,536 tokens x 16 heads, `benchmarks/kernels_ab.py`, 2026-12-01): d=64
# 2.96-3.00 vs 3.11-3.13 at 16k, 3.36 vs 3.55-3.56 at 64k (1024: 3.08 / 3.43); d=128 28.69 vs
# 29.50 at 64k; d=32 1.50 vs 1.46 at 16k, 1.77 vs 1.78 at 64k (stays 256).
FORWARD_CHUNK = {64: 512, 128: 512}
# The row-block kernels put (batch x heads) on the launch grid's second axis, which CUDA caps
# at 65,535 programs; larger batches run in slices of the batch (_in_batch_slices).
MAX_GRID_Y = 65535
# Up to this T (by head dim) the default is one chunk, the attention form: fwd+bwd ms against
# 256-token chunks on an H200 (bf16, 65,536 tokens x 16 heads, `benchmarks/kernels.py
# --quadratic`, 2026-11-30): d=32 5.77 vs 6.73 at 4k, 10.91 vs 6.54 at 8k; d=64 14.19 vs
# 16.03 at 8k, 19.49 vs 14.86 at 12k; d=128 49.2 vs 139.0 at 16k (32k extrapolates to ~98).
# d=16 is not measured: half of d=32's.
QUADRATIC_MAX = {16: 2048, 32: 4096, 64: 8192, 128: 32768}


def _warps(d: int) -> int:
    return 8 if d >= 128 else 4


def quadratic_max(d: int) -> int:
    """Longest T run as one chunk at head dim d: no state at all, the plain (q.k)^2 attention
    form, which beats building and reading D x d states while the sequence is short (its cost
    grows with T d per token, the states' with d^3). RETENTION_TRITON_QUADRATIC_MAX overrides
    (0 turns it off)."""
    env = os.environ.get("RETENTION_TRITON_QUADRATIC_MAX")
    return int(env) if env else QUADRATIC_MAX.get(d, 0)


def forward_chunk(d: int) -> int:
    """The longest chunk of a forward-only call (no gradient wanted: prefill, evaluation) at
    head dim d: FORWARD_CHUNK, or RETENTION_TRITON_FORWARD_CHUNK (any d)."""
    env = os.environ.get("RETENTION_TRITON_FORWARD_CHUNK")
    return int(env) if env else FORWARD_CHUNK.get(d, MAX_CHUNK)


def default_chunk(T: int, d: int = 64, stateless: bool = True,
                  forward_only: bool = False) -> int:
    """One chunk (T rounded up to 64) for a stateless call up to quadratic_max(d), else 256,
    or forward_chunk(d) for a forward-only call (less for short T). A call with an initial
    state or asking for the final state (prefill) needs the state scan anyway; one chunk
    would only add the quadratic work."""
    if stateless and T <= quadratic_max(d):
        return max(64, triton.cdiv(T, 64) * 64)
    top = forward_chunk(d) if forward_only else MAX_CHUNK
    return min(top, max(64, triton.next_power_of_2(T)))


def kernel_chunk(T: int, chunk_size, d: int = 64, stateless: bool = True,
                 forward_only: bool = False) -> int:
    """The chunk the kernels run: RETENTION_TRITON_CHUNK if set (a tuning override that beats
    chunk_size too), else chunk_size, else default_chunk(T, d, stateless, forward_only). The
    torch dispatcher passes None (the model config's chunk is the ops path's)."""
    env = os.environ.get("RETENTION_TRITON_CHUNK")
    if env:
        return int(env)
    return int(chunk_size) if chunk_size else default_chunk(T, d, stateless, forward_only)


# The one-chunk kernels (attention.py) by head dim: (rows, cols, warps, stages). fwd and dq
# take `rows` queries per program and `cols` keys per step; dkv `rows` keys and `cols` queries.
# The fastest of `benchmarks/kernels.py --attn-tune` at d=64 and 128 (H200, 2026-11-30);
# d=16 and 32 take d=64's.
ATTN_BLOCKS = {
    "fwd": {16: (64, 64, 4, 3), 32: (64, 64, 4, 3), 64: (64, 64, 4, 3), 128: (64, 32, 4, 3)},
    "dq": {16: (64, 64, 4, 3), 32: (64, 64, 4, 3), 64: (64, 64, 4, 3), 128: (128, 64, 8, 3)},
    "dkv": {16: (64, 32, 4, 3), 32: (64, 32, 4, 3), 64: (64, 32, 4, 3), 128: (64, 32, 4, 2)},
    # dv and dk in two launches (ATTN_SPLIT_DKV): --attn-tune's fastest split settings
    "dv": {16: (64, 32, 4, 3), 32: (64, 32, 4, 3), 64: (64, 32, 4, 3), 128: (64, 64, 4, 2)},
    "dk": {16: (64, 32, 4, 3), 32: (64, 32, 4, 3), 64: (64, 32, 4, 3), 128: (64, 64, 4, 2)},
}
# float32 operands (float16 and float32 inputs) double the tiles: d=128's 128-row dq block
# then needs 192-288 KB of shared memory, more than an A100 (163 KB) or H100 (227 KB) has at
# any stage count for float32 inputs (benchmarks/sm90_compile.py --arch 80); 64 x 32 needs
# 90-107 KB. Not timed: float32 operands are the correctness path, not the fast one.
ATTN_BLOCKS_F32 = {"dq": {128: (64, 32, 4, 2)}}


# ptxas register caps, by kernel and head dim, for bf16 operands on Hopper: at 168 registers
# three programs of 4 warps share a multiprocessor instead of two (they compiled to 206-240),
# which hides more of each one's latency. Timed on an H200 (2026-11-30, fwd+bwd ms, capped
# against uncapped): the one-chunk dq and dk/dv 6.23-6.34 against 6.78-6.85 at 4k and
# 2.03-2.11 against 2.26 at 1k (no spills in dq, 24 bytes in dk/dv); the chunked forward read
# 12.85-12.86 against 12.99-13.00 at 64k. None where untimed: float32 operands, other head
# dims (d=128 spills ~1 KB), other GPUs; the chunked backward kernels and the scan spill
# 360-1,100 bytes at 168 and ran slower. RETENTION_TRITON_MAXNREG overrides per kernel
# (launch.ENV_REGISTER_CAPS; 0 removes a cap).
REGISTER_CAPS = {(64, "_attn_dq"): 168, (64, "_attn_dkv"): 168, (64, "_out_fwd"): 168}


def _register_cap(kernel, d: int, dt_tl, major: int) -> dict:
    """{"maxnreg": cap} for the launch of kernel at head dim d, or {} (see REGISTER_CAPS)."""
    cap = _timed_setting(None, REGISTER_CAPS, d, dt_tl, kernel.fn.__name__, major)
    return {"maxnreg": cap} if cap else {}


def _attn_blocks(kind: str, d: int, dt_tl) -> tuple[int, int, int, int]:
    """(rows, cols, warps, stages) of a one-chunk kernel at head dim d for operands dt_tl."""
    if dt_tl == tl.float32 and d in ATTN_BLOCKS_F32.get(kind, {}):
        return ATTN_BLOCKS_F32[kind][d]
    return ATTN_BLOCKS[kind][d]


# The one-chunk dk/dv in one launch (False) or two, dv then dk (True: the scores computed
# twice, fewer live registers each; 25-27% slower by --attn-tune on an H200, 2026-11-30).
# RETENTION_TRITON_ATTN_SPLIT_DKV=1 forces two everywhere.
ATTN_SPLIT_DKV = {d: os.environ.get("RETENTION_TRITON_ATTN_SPLIT_DKV") == "1"
                  for d in (16, 32, 64, 128)}
# The backward's transposed operands, by kernel and head dim: tl.trans of loaded tiles (True:
# less shared memory, 1-20% faster) or tiles loaded transposed (False).
# RETENTION_TRITON_ATTN_TRANS=0|1 forces either everywhere.
_TRANS_ENV = os.environ.get("RETENTION_TRITON_ATTN_TRANS")
ATTN_TRANS = {kind: {d: _TRANS_ENV != "0" for d in (16, 32, 64, 128)}
              for kind in ("dq", "dkv")}


# The one-chunk dq and dk summands formed from the same factors in the same order, so they
# round alike: the log-gate gradient sums their difference over T^2 pairs, and its error at
# T=4096 (GPU grid, d=64) is 4.4e-3 against 9.3e-3 with dq's query factor applied after
# its sum, for 0-1% more fwd+bwd time (H200, 2026-11-30). Where the blocks allow it
# (_matched_blocks); RETENTION_TRITON_ATTN_MATCHED=0 turns it off.
ATTN_MATCHED = _env_flag("RETENTION_TRITON_ATTN_MATCHED", True)


def _attn_len(T: int) -> int:
    """Gates' padded length for the one-chunk kernels: a multiple of every block they use."""
    top = max(max(r, c) for table in ATTN_BLOCKS.values() for r, c, _, _ in table.values())
    return triton.cdiv(T, top) * top


def _plan(T: int, chunk: int) -> tuple[int, int, int]:
    """Row block BM, chunks N and padded length Tp for chunk size `chunk`."""
    bm = next(b for b in (BLOCK_M, 64, 32, 16) if b <= chunk and chunk % b == 0)
    n = triton.cdiv(T, chunk)
    return bm, n, n * chunk


def _dot_types(dtype: torch.dtype):
    """Matrix operand type and precision: bf16 stays bf16; float16 states would overflow, so
    float16 and float32 inputs multiply in float32 (tf32 for float16, exact for float32)."""
    if dtype == torch.bfloat16:
        return tl.bfloat16, torch.bfloat16, "tf32"
    return tl.float32, torch.float32, ("tf32" if dtype == torch.float16 else "ieee")


def _chunk_gates(log_g_BTH, chunk: int, n: int, key_block: int = 0):
    """Log-gates summed from each chunk's start, [B*H, n*chunk] float32 (padding adds no
    decay), by rowwise._gate_cumsum; with key_block, also (bg, ek): ek = e^{b_R - b_j} for
    every key j, R the last position of j's block of key_block keys (<= 1: b does not
    increase), the key side of the one-chunk kernels' gate off the diagonal."""
    B, T, H = log_g_BTH.shape
    bg = torch.empty(B * H, n * chunk, device=log_g_BTH.device, dtype=torch.float32)
    ek = torch.empty_like(bg) if key_block else bg
    bt = min(1024, chunk & -chunk)   # the largest power of two <= 1024 dividing the chunk
    if key_block and bt % key_block:
        raise ValueError(f"key blocks of {key_block} must divide the gate tile {bt}")
    rowwise._gate_cumsum[(n, B * H)](log_g_BTH.contiguous(), bg, ek, T, H, n * chunk, C=chunk,
                                     BT=bt, KB=key_block)
    return (bg, ek) if key_block else bg


def _stages(d, dt_tl):
    # Shared memory: the per-block kernels stream [W, d] state tiles; float32 doubles them.
    return 2 if d >= 128 or dt_tl == tl.float32 else 3


# dk and dv of the keys: "joint" (one pass, both accumulators live), "split" (a dv launch, then
# a dk launch: fewer live registers each, the intra-chunk scores computed twice) or
# "sequential" (those two passes one after the other in one program). At d=64 on an H200
# (bf16, 65,536 tokens x 16 heads, 2026-11-30) sequential was 2.3% faster than joint and as
# fast as split, whose 3-stage dv launch gave run-to-run different dv there with triton 3.6
# (2-3 of 8-16 runs; never joint, sequential or 2-stage launches: gpu_check.py --only
# deterministic); so sequential below d=128, and split at d=128 (2 stages), where it won.
# RETENTION_TRITON_DKV=joint|split|sequential forces one everywhere.
DKV_PARTS = {"joint": (0,), "split": (1, 2), "sequential": (3,)}
_DKV_ENV = os.environ.get("RETENTION_TRITON_DKV")
if _DKV_ENV is not None and _DKV_ENV not in DKV_PARTS:
    raise ValueError(f"RETENTION_TRITON_DKV must be one of {sorted(DKV_PARTS)}, got {_DKV_ENV!r}")
DKV_LAUNCH = {d: _DKV_ENV or ("split" if d >= 128 else "sequential") for d in (16, 32, 64, 128)}

# The state terms of dq and dk (chunked._grad_rows): "fused" into _dq_bwd and _dkv_bwd, or
# "split" into their own launch (chunked._state_grad, GRAD_BLOCK_M rows per program) after
# those write the rest in float32 (_split_state_grad picks).
# RETENTION_TRITON_STATE_GRAD=fused|split forces one, RETENTION_TRITON_STATE_GRAD_ROWS=
# 16|32|64|128 sets the split launch's rows per program.
STATE_GRAD = os.environ.get("RETENTION_TRITON_STATE_GRAD")
if STATE_GRAD not in (None, "fused", "split"):
    raise ValueError(f"RETENTION_TRITON_STATE_GRAD must be fused or split, got {STATE_GRAD!r}")
GRAD_BLOCK_M = int(os.environ.get("RETENTION_TRITON_STATE_GRAD_ROWS", "128"))


def _split_state_grad(d: int, kv_seqs: int) -> bool:
    """Whether dq's and dk's state terms take their own launch, as timed (H200, 2026-12-01,
    bf16, 65,536 tokens x 16 heads, fwd+bwd; benchmarks.md): at d=128 (64k: 100.2 -> 84.8 ms,
    with 128 rows per program; 64 rows gained nothing), and at d=64 with few sequences x KV
    heads, where the reverse scan leaves multiprocessors idle (B x H = 16 at 64k: 11.56 ->
    10.98 ms), but not with more (64 at 16k: 11.07 -> 11.42 ms)."""
    if STATE_GRAD is not None:
        return STATE_GRAD == "split"
    return d >= 128 or kv_seqs <= 32

# The chunked kernels' intra-chunk gate off the diagonal block as a rank-one product, no
# exponential per pair (chunked._intra_gate), or e^{b_i - b_j} per pair everywhere (the
# default until timed on a GPU): RETENTION_TRITON_CHUNK_RANK1=1.
CHUNK_RANK1 = os.environ.get("RETENTION_TRITON_CHUNK_RANK1") == "1"

# Which operand of the state scan's matmuls carries the per-token scale (chunked._scaled_dot):
# "b" rebuilds the values tile in shared memory per row a, "a" scales x^T in registers.
SCAN_BSIDE = os.environ.get("RETENTION_TRITON_SCAN_OPERAND", "b") == "b"

# With operand "b" and an even number of rows per program: the rows' scaled values tiles side
# by side, one dot of twice the width per pair of rows (chunked._paired_dot),
# 1-2% faster fwd+bwd at d=64 (H200, 2026-11-30); RETENTION_TRITON_SCAN_PAIR=0 gives one dot
# per row. float16 inputs (float32 operands at tf32 precision) never pair: triton 3.6 fails to
# compile that dot (an MLIR pass error; benchmarks/sm90_compile.py shows it offline).
SCAN_PAIR = _env_flag("RETENTION_TRITON_SCAN_PAIR", True)

# With operand "b" and tensor-core operands: the scan's accumulators as [values, features]
# (chunked._state_scan TRANS), so a row a of W_I < d features rebuilds and multiplies W_I
# columns, not d. Exact float32 dots (PREC "ieee") stay untransposed: they spill more so.
SCAN_TRANS = _env_flag("RETENTION_TRITON_SCAN_TRANS", True)
# The scan reads a token's columns x_a of its AG rows as one vector load instead of one
# 2-byte load per column: fwd+bwd 12.52 / 12.81 -> 12.33 / 12.58 ms at 16k /
# 64k (H200, 2026-12-01; ncu had 2 of each sector's 32 bytes used by those loads).
# RETENTION_TRITON_SCAN_VEC_COLS=0|1.
SCAN_VEC_COLS = _env_flag("RETENTION_TRITON_SCAN_VEC_COLS", True)
# The scan's per-token log-gates (and den, delta in the reverse scan) loaded one step ahead
# into registers rather than through shared memory (chunked._state_scan PRE).
# RETENTION_TRITON_SCAN_PREFETCH=0|1.
SCAN_PREFETCH = _env_flag("RETENTION_TRITON_SCAN_PREFETCH", True)

# Rows a in pairs in the state reads (chunked._read_block_paired), per block of rows: 0 never,
# 1 where the block's W is a power of two, 2 for every W (2W cut into power-of-two parts:
# W = 48 as 32 + 64). RETENTION_TRITON_READ_PAIR=0|1|2 forces one level (_read_pair).
READ_PAIR = _env_choice("RETENTION_TRITON_READ_PAIR", (0, 1, 2))

# The compute capability (major) a launch's settings are chosen for: the GPU's own on CUDA;
# off CUDA (the interpreter, benchmarks/sm90_compile.py, which sets it from --arch) this one.
OFF_CUDA_MAJOR = 9


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@lru_cache(maxsize=None)
def _cuda_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def _major(device: torch.device) -> int:
    if device.type != "cuda":
        return OFF_CUDA_MAJOR
    return _cuda_major(_cuda_index(device))


@lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sms(device: torch.device) -> int:
    """Multiprocessors of the device (an H100's 132 off CUDA)."""
    if device.type != "cuda":
        return 132
    return _cuda_sms(_cuda_index(device))


# dq of the chunked backward on a side stream, beside the reverse state scan and dk/dv (CUDA
# only): dq reads the forward's states, not the state gradients, and with few programs per
# head (B x H small: B=1 x 12 heads at 64k in the small model) the scan's last wave leaves
# SMs idle. RETENTION_TRITON_OVERLAP_DQ=0 runs it in stream order. Each kernel writes only
# its own outputs, so the overlap changes no bit (gpu_check.py's determinism case).
OVERLAP_DQ = _env_flag("RETENTION_TRITON_OVERLAP_DQ", True)
_SIDE_STREAMS: dict = {}


def _side_stream(device: torch.device):
    """One extra CUDA stream per device, or None (off CUDA, e.g. under the interpreter, or
    with OVERLAP_DQ off)."""
    if device.type != "cuda" or not OVERLAP_DQ:
        return None
    index = _cuda_index(device)
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]


def _row_group(d, reverse=False, paired=True, trans=True):
    """Rows a per state-scan program (accumulators of [d, 64]): 2, except 4 at d=128 in the
    forward scan (16% faster forward) and, with rows in pairs, in the reverse scan too (6%
    faster fwd+bwd, 141.5 against 150.2 ms), and 4 at d=64 with the transposed scan and rows
    in pairs (fwd+bwd 13.76-13.78 / 14.06-14.08 against 14.48-14.49 / 14.29-14.37 ms at 16k /
    64k; the untransposed scan was neutral to 2% slower with 4; H200, 2026-11-30).
    RETENTION_TRITON_SCAN_ROWS overrides: 1, 2 or 4."""
    rows = _env_choice("RETENTION_TRITON_SCAN_ROWS", (1, 2, 4))
    wide = (d >= 128 and (paired or not reverse)) or (d == 64 and trans and paired)
    return rows or (4 if wide else 2)


def _row_group_narrow(d, ag, dt_tl, major, paired, trans, reverse, head_tiles, sms):
    """Rows a per state-scan program for the rows a >= d/2 (chunked._state_scan AGN), whose
    blocks are at most d/2 wide; ag (as the other rows) unless timed otherwise. 8 at d=64 and
    128 with bf16 operands on Hopper (transposed, rows in pairs): such a program rebuilds as
    many columns per step as one of 4 wider rows, and the scan's programs per head fall from
    17 to 13 at d=64 (33 to 25 at 128). With the 3-stage scan (_scan_step), fwd+bwd 12.17 ->
    11.94-11.99 ms at 16k (d=64), 104.1 -> 100.8 ms at 64k (d=128; H200, 2026-12-01). Not in a
    forward scan whose rows' programs fit in one wave of two per multiprocessor (16 heads at
    64k, d=64): its longest programs then set its time, and the 8-row ones are longer
    (forward 3.57 -> 3.62 ms at 64k). RETENTION_TRITON_SCAN_ROWS_NARROW overrides (2, 4 or
    8; 8 needs rows in pairs and the transposed scan, and at most d/2 rows)."""
    rows = _env_choice("RETENTION_TRITON_SCAN_ROWS_NARROW", (2, 4, 8))
    if rows is None:   # head_tiles: batch x KV heads x value tiles, each d/ag row programs
        one_wave = not reverse and head_tiles * (d // ag) <= 2 * sms
        timed = 0 if one_wave else _timed_setting(None, {(64, "scan"): 8, (128, "scan"): 8},
                                                   d, dt_tl, "scan", major)
        rows = timed or ag
    if not trans or rows > d - chunked._wide_rows(d) or (rows == 8 and not paired):
        return ag
    return rows


def _read_pair(d, dt_tl, kernel, major=9):
    """The pair level (above) of the state read of the forward (_out_fwd, "out") and of dv
    (_dkv_bwd, "dkv"), with bf16 operands, as timed (H200, 2026-11-30, fwd+bwd at d=128 in
    256-token chunks, T=4096; per-kernel profiler times at d=64, T=65536):
    - d=64: 2 in _out_fwd (1.86 -> 1.80 ms), 1 in _dkv_bwd (level 2 there: 4.81 -> 5.17);
      level 1 against none: _out_fwd 2.05 -> 1.85, _dkv_bwd 5.06 -> 4.78;
    - d=128: 2 in both (fwd 43.2 -> 35.8 ms, fwd+bwd 138.9 -> 124.4; level 1: 134.9).
    0 where untimed: d=32, float32 operands, and GPUs other than Hopper (major 9; on an
    A100, sm_80, pairs at d=128 spill ten times more: benchmarks/sm90_compile.py --arch 80).
    RETENTION_TRITON_READ_PAIR (ops.READ_PAIR) overrides."""
    return _timed_setting(READ_PAIR, {(64, "out"): 2, (64, "dkv"): 1, (128, "out"): 2,
                                      (128, "dkv"): 2}, d, dt_tl, kernel, major)


def _timed_setting(forced, timed, d, dt_tl, kernel, major):
    """The forced setting, else the timed one for (d, kernel) with bf16 operands on Hopper
    (major 9), else 0 (pair levels, register caps)."""
    if forced is not None:
        return forced
    if dt_tl != tl.bfloat16 or major != 9:
        return 0
    return timed.get((d, kernel), 0)


def _scan_pairs(dt_tl, prec) -> bool:
    """Rows a in pairs in the state scan (SCAN_PAIR, with the scale on operand b), except for
    float32 operands at tf32 (float16 inputs): triton 3.6 fails to compile that paired dot
    for the GPU. The interpreter runs it (the CI checks force it there)."""
    return SCAN_PAIR and SCAN_BSIDE and not (dt_tl == tl.float32 and prec == "tf32")


def _scan_values(d):
    """Value columns per state-scan program: 64 (or d when smaller).
    RETENTION_TRITON_SCAN_BV overrides (a power of two from 16 up to min(d, 64)): smaller
    tiles mean more programs, for batches whose B x H leaves the last wave short."""
    env = os.environ.get("RETENTION_TRITON_SCAN_BV")
    if env:
        if env not in ("16", "32", "64") or int(env) > d:
            raise ValueError(f"RETENTION_TRITON_SCAN_BV must be 16, 32 or 64 and at most the "
                             f"head dim {d}, got {env!r}")
        return int(env)
    return min(d, 64)


def _scan_warps(d):
    """Warps per state-scan program: 4 up to d=64, where the transposed accumulators are
    [64, 128] and one warpgroup reads the y^T operand once (2 warpgroups split N and each read
    it): 2.21 against 2.57 ms per scan at 64k, fwd+bwd 14.3 against 14.9 ms (H200, 2026-11-30);
    8 at d=128, where 4 spill (170 against 139 ms). RETENTION_TRITON_SCAN_WARPS overrides."""
    return _env_choice("RETENTION_TRITON_SCAN_WARPS", (4, 8)) or (4 if d <= 64 else 8)


def _scan_step(chunk, d, dt_tl, major, reverse=False):
    """Tokens per step of the state scan (a divisor of the chunk) and pipeline stages. 128
    tokens measured 5-7% faster than 64 at d=64 (H200, 2026-11-30); at d=128 a 128-token step
    needs 165 KB of shared memory (one program per SM), so it stays at 64 there. 3 stages
    with bf16 operands on Hopper: at d=64 114,688 bytes of shared memory, so two programs
    still share a multiprocessor (228 KB, 1 KB reserved per program; PRE keeps the per-token
    vectors out of it), fwd+bwd 12.32-12.37 / 12.61 -> 12.17 / 12.47-12.50 ms at 16k / 64k;
    at d=128 98,304 bytes (one program of 8 warps per multiprocessor either way), 110.9 ->
    104.1 ms at 64k (H200, 2026-12-01); 2 elsewhere (untimed; an A100 has 164 KB).
    RETENTION_TRITON_SCAN_STEP (a smaller top) and RETENTION_TRITON_SCAN_STAGES ("S": both
    scans, "F:R": the forward's and the reverse's) override."""
    top = _env_choice("RETENTION_TRITON_SCAN_STEP", (16, 32, 64, 128)) or (128 if d <= 64 else 64)
    stages = _scan_stages(os.environ.get("RETENTION_TRITON_SCAN_STAGES", ""))
    if stages is None:
        timed = _timed_setting(None, {(64, "scan"): 3, (128, "scan"): 3}, d, dt_tl, "scan",
                               major)
        stages = (timed or 2,) * 2
    return (next(b for b in (128, 64, 32, 16) if b <= top and chunk % b == 0),
            stages[1] if reverse else stages[0])


def _scan_stages(spec: str) -> Optional[tuple[int, int]]:
    """RETENTION_TRITON_SCAN_STAGES: "S" or "F:R" (1 to 4 each) -> (forward, reverse)."""
    if not spec:
        return None
    parts = spec.split(":")
    if len(parts) > 2 or any(p.strip() not in ("1", "2", "3", "4") for p in parts):
        raise ValueError(f"RETENTION_TRITON_SCAN_STAGES must be S or F:R with each 1 to 4, "
                         f"got {spec!r}")
    return int(parts[0]), int(parts[-1])


def _state_scan(X, Yv, bg, den, delta, init_S, init_Z, chunk, n, T, H, Hq, scale,
                dt_tl, dt_torch, prec, reverse, store_fin=True):
    """Per-chunk states (or state gradients) Sst [B*H,N,Di,d], Zst [B*H,N,d,d] and the final
    state (or initial-state gradient) SF [B*H,Di,d], ZF [B*H,d,d] (chunked._state_scan);
    SF and ZF are None when store_fin is False (nobody reads them)."""
    B = X.shape[0]
    d = X.shape[-1]
    Di = internal_dim(d)
    dev = X.device
    Sst = torch.empty(B * H, n, Di, d, device=dev, dtype=dt_torch)
    Zst = torch.empty(B * H, n, d, d, device=dev, dtype=torch.float32)
    if store_fin:
        SF = torch.empty(B * H, Di, d, device=dev, dtype=torch.float32)
        ZF = torch.empty(B * H, d, d, device=dev, dtype=torch.float32)
    else:   # unused pointers
        SF, ZF = Zst, Zst
    pair = _scan_pairs(dt_tl, prec)
    trans = SCAN_TRANS and prec != "ieee"
    ag = _row_group(d, reverse, pair, trans)
    pair = pair and ag % 2 == 0
    bv = _scan_values(d)
    major = _major(dev)
    agn = _row_group_narrow(d, ag, dt_tl, major, pair, trans, reverse, B * H * (d // bv),
                            _sms(dev))
    half = chunked._wide_rows(d)
    has_init = init_S is not None
    bk, stages = _scan_step(chunk, d, dt_tl, major, reverse)
    launch.fitted(chunked._state_scan, (B * H * (d // bv), half // ag + (d - half) // agn + 1),
        X, Yv, bg, den if den is not None else bg, delta if delta is not None else bg,
        init_S if has_init else SF, init_Z if has_init else ZF, Sst, Zst, SF, ZF, scale,
        T, H, Hq, n * chunk, n,
        D_HEAD=d, DINT=Di, C=chunk, BK=bk, AG=ag, BV=bv, DT=dt_tl, PREC=prec,
        HAS_INIT=has_init, REVERSE=reverse, BSIDE=SCAN_BSIDE, STORE_FIN=store_fin,
        PAIR=pair, TRANS=trans, VEC=SCAN_VEC_COLS, AGN=agn, PRE=SCAN_PREFETCH,
        num_warps=_scan_warps(d) if trans else 8,
        num_stages=stages)
    return (Sst, Zst, SF, ZF) if store_fin else (Sst, Zst, None, None)


def _forward_states(k, v, bg, S0, z0, chunk, n, T, Hq, scale, dt_tl, dt_torch, prec,
                    store_fin):
    """The forward state scan from the initial state (canonical, or None): the per-chunk
    states and, when store_fin, the final one (_state_scan)."""
    B, _, H, _ = k.shape
    S0i, Z0i = _internal_state(S0, z0, B, H) if S0 is not None else (None, None)
    return _state_scan(k, v, bg, None, None, S0i, Z0i, chunk, n, T, H, Hq, scale, dt_tl,
                       dt_torch, prec, reverse=False, store_fin=store_fin)


def _internal_state(S, z, B, H):
    Si, Zi = to_internal(S, z)
    return (Si.reshape(B * H, Si.shape[2], Si.shape[3]).contiguous(),
            Zi.reshape(B * H, Zi.shape[2], Zi.shape[3]).contiguous())


@torch.library.custom_op("retention::triton_power_retention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_g: torch.Tensor,
            S0: Optional[torch.Tensor], z0: Optional[torch.Tensor], scale: float,
            chunk: int, keep_states: bool = True, want_state: bool = True
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                       torch.Tensor]:
    """y [B,T,Hq,d], den [B,Hq,T] (saved for backward), final S [B,H,D,d], z [B,H,D], and the
    per-chunk states Sst [B*H,N,Di,d], Zst [B*H,N,d,d] for the backward (empty when
    keep_states is False: the backward then recomputes them). S and z are empty when
    want_state is False (training without a state output skips their stores)."""
    B, T, Hq, d = q.shape
    H = k.shape[2]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    bm, n, Tp = _plan(T, chunk)
    dt_tl, dt_torch, prec = _dot_types(q.dtype)
    has_state = not _stateless(n, S0, want_state)
    bg = _chunk_gates(log_g, chunk, n) if has_state else None
    if has_state:
        Sst, Zst, SF, ZF = _forward_states(k, v, bg, S0, z0, chunk, n, T, Hq, scale, dt_tl,
                                           dt_torch, prec, want_state)
    else:
        Sst, Zst = q.new_empty(0, dtype=dt_torch), q.new_empty(0, dtype=torch.float32)
    y = torch.empty_like(q)
    den = torch.empty(B, Hq, T, device=q.device, dtype=torch.float32)
    if has_state:
        major = _major(q.device)
        launch.fitted(chunked._out_fwd, (Tp // bm, B * Hq),
            q, k, v, bg, Sst, Zst, y, den, scale, T, H, Hq, Tp, n, D_HEAD=d,
            DINT=internal_dim(d), C=chunk, BM=bm, DT=dt_tl, PREC=prec, RANK1=CHUNK_RANK1,
            READ_PAIR=_read_pair(d, dt_tl, "out", major), num_warps=_warps(d),
            num_stages=_stages(d, dt_tl), **_register_cap(chunked._out_fwd, d, dt_tl, major))
    else:
        _attention_fwd(q, k, v, log_g, y, den, scale, dt_tl, prec)
    if want_state:
        S, z = to_canonical(SF.view(B, H, -1, d), ZF.view(B, H, d, d))
    else:
        S, z = q.new_empty(0, dtype=torch.float32), q.new_empty(0, dtype=torch.float32)
    if not keep_states:
        Sst, Zst = Sst.new_empty(0), Zst.new_empty(0)
    return y, den, S, z, Sst, Zst


def _attention_fwd(q, k, v, log_g, y, den, scale, dt_tl, prec):
    """The one-chunk forward (attention.py): y and den, written in place."""
    B, T, Hq, d = q.shape
    H = k.shape[2]
    Tp = _attn_len(T)
    bm, bn, warps, stages = _attn_blocks("fwd", d, dt_tl)
    bg, ek = _chunk_gates(log_g, Tp, 1, key_block=bn)
    launch.fitted(attention._attn_fwd, (triton.cdiv(T, bm), B * Hq),
        q, k, v, bg, ek, y, den, scale, T, H, Hq, Tp,
        D_HEAD=d, BM=bm, BN=bn, DT=dt_tl, PREC=prec, num_warps=warps, num_stages=stages)


def _attention_bwd(q, k, v, log_g, dy, y, den, dq, dk, dv, qdq, kdk, scale, dt_tl, prec):
    """The one-chunk backward (attention.py): dq, dk, dv in place in the inputs' dtype, with
    the row sums q.dq [B,Hq,T] and k.dk [B,H,T]. The dq launch also writes the query rows'
    delta, 1/den and gate factor that the dk/dv launch reads; returned ([B*Hq, Tp] float32,
    defined on dq's rows) for the tests."""
    B, T, Hq, d = q.shape
    H = k.shape[2]
    Tp = _attn_len(T)
    bm, bn, warps, stages = _attn_blocks("dq", d, dt_tl)
    bg, ek = _chunk_gates(log_g, Tp, 1, key_block=bn)
    major = _major(q.device)
    qb = _matched_blocks(d, dt_tl)
    kinds = ("dv", "dk") if ATTN_SPLIT_DKV[d] else ("dkv",)
    keys, queries = _attn_blocks(kinds[0], d, dt_tl)[:2]
    # dk/dv read the rows of its key blocks' query blocks; dq writes every row of its own
    # blocks, which must cover them (the arrays are not zero-filled past dq's rows).
    if bm % keys or keys % queries or any(
            _attn_blocks(kind, d, dt_tl)[:2] != (keys, queries) for kind in kinds):
        raise ValueError(f"dq blocks of {bm} rows must hold whole dk/dv blocks "
                         f"of {keys} keys x {queries} queries")
    delta = torch.empty(B * Hq, Tp, device=q.device, dtype=torch.float32)
    rden, cq = torch.empty_like(delta), torch.empty_like(delta)
    launch.fitted(attention._attn_dq, (triton.cdiv(T, bm), B * Hq),
        q, k, v, bg, ek, dy, y, den, delta, rden, cq, dq, qdq, scale, T, H, Hq, Tp,
        D_HEAD=d, BM=bm, BN=bn, DT=dt_tl, PREC=prec, TRANS=ATTN_TRANS["dq"][d],
        # the query factor's reference row: that of dq's block (matched summands) or dk/dv's
        MATCHED=qb > 0, QB=qb or queries, num_warps=warps, num_stages=stages,
        **_register_cap(attention._attn_dq, d, dt_tl, major))
    for part in (1, 2) if ATTN_SPLIT_DKV[d] else (0,):
        bn, bm, warps, stages = _attn_blocks(("dkv", "dv", "dk")[part], d, dt_tl)
        launch.fitted(attention._attn_dkv, (triton.cdiv(T, bn), B * H),
            q, k, v, bg, ek, dy, rden, cq, delta, dk, dv, kdk, scale, T, H, Hq, Tp,
            D_HEAD=d, BN=bn, BM=bm, DT=dt_tl, PREC=prec, TRANS=ATTN_TRANS["dkv"][d], PART=part,
            QB=qb, num_warps=warps, num_stages=stages,   # caps timed on the joint launch only
            **(_register_cap(attention._attn_dkv, d, dt_tl, major) if part == 0 else {}))
    return delta, rden, cq


def _matched_blocks(d: int, dt_tl) -> int:
    """dq's query block when the one-chunk dq and dk form their summands from the same
    factors in the same order (ATTN_MATCHED), else 0. Both must split the gate at the same
    rows and take the same pairs as diagonal: dq's query and key blocks and dk/dv's key block
    all of one size, dk/dv's query blocks nested in it (d <= 64; not d=128's 128-row dq)."""
    if not ATTN_MATCHED:
        return 0
    bm, bn = _attn_blocks("dq", d, dt_tl)[:2]
    kinds = ("dv", "dk") if ATTN_SPLIT_DKV[d] else ("dkv",)
    dkv = [_attn_blocks(kind, d, dt_tl)[:2] for kind in kinds]   # (keys, queries) per launch
    fits = bm == bn and all(keys == bm and bm % queries == 0 for keys, queries in dkv)
    return bm if fits else 0


def _log_gate_grad(qdq_BQT: torch.Tensor, kdk_BHT: torch.Tensor,
                   last_BH: Optional[torch.Tensor]) -> torch.Tensor:
    """d log_g [B,T,H]: log_g_t enters every G_i with i >= t, so its gradient is the reversed
    cumulative sum of dG_i = (q_i.dq_i summed over the group - k_i.dk_i) / 2, plus at the last
    step the final state's term last_BH (rowwise._gate_grad)."""
    B, H, T = kdk_BHT.shape
    dlog_g = torch.empty(B, T, H, device=kdk_BHT.device, dtype=torch.float32)
    # Spans of the sequence per program: ~512 programs in all, at most 32 spans per head
    # (each program first sums the terms after its span: reads grow with the spans).
    bt = 1024
    span = max(bt, triton.next_power_of_2(triton.cdiv(T, 32)),
               triton.next_power_of_2(triton.cdiv(T * B * H, 512)))
    rowwise._gate_grad[(B * H, triton.cdiv(T, span))](
        qdq_BQT, kdk_BHT, last_BH if last_BH is not None else kdk_BHT, dlog_g, T, H,
        RG=qdq_BQT.shape[1] // H, BT=bt, CT=span, HAS_LAST=last_BH is not None)
    return dlog_g


def _chunked_bwd(q, k, v, bg, dy, den, delta, Sst, Zst, dSi, dZi, dq, dk, dv, qdq, kdk, scale,
                 chunk, want_dS0, dt_tl, dt_torch, prec):
    """The chunked backward: the reverse state scan, then dq (from the forward's states) and
    dk, dv (from the state gradients), in place in the inputs' dtype, with the row sums q.dq
    [B,Hq,T] and k.dk [B,H,T]. Returns the initial state's gradient (internal layout) when
    want_dS0, else (None, None)."""
    B, T, Hq, d = q.shape
    H = k.shape[2]
    bm, n, Tp = _plan(T, chunk)
    Di = internal_dim(d)
    major = _major(q.device)
    side = _side_stream(q.device)
    if side is not None:   # everything dq reads is ready on the caller's stream by now
        side.wait_stream(torch.cuda.current_stream(q.device))
    dSst, dZst, dS0i, dZ0i = _state_scan(q, dy, bg, den, delta, dSi, dZi, chunk, n, T, H, Hq,
                                         scale, dt_tl, dt_torch, prec, reverse=True,
                                         store_fin=want_dS0)
    fused = not _split_state_grad(d, B * H)
    # split: the row-block kernels write the rest of dq and dk in float32 for _state_grad
    dq_rest = dq if fused else torch.empty(q.shape, device=q.device, dtype=torch.float32)
    dk_rest = dk if fused else torch.empty(k.shape, device=q.device, dtype=torch.float32)
    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        launch.fitted(chunked._dq_bwd, (Tp // bm, B * Hq),
            q, k, v, bg, Sst, Zst, dy, den, delta, dq_rest, qdq, scale, T, H, Hq, Tp, n,
            D_HEAD=d, DINT=Di, C=chunk, BM=bm, DT=dt_tl, PREC=prec, RANK1=CHUNK_RANK1,
            FUSED=fused, num_warps=_warps(d), num_stages=_stages(d, dt_tl))
        if not fused:
            _state_grad(q, dy, bg, den, Sst, dq_rest, dq, qdq, scale, chunk, n, H, True,
                        dt_tl, prec)
    for part in DKV_PARTS[DKV_LAUNCH[d]]:
        launch.fitted(chunked._dkv_bwd, (Tp // bm, B * H),
            q, k, v, bg, dSst, dZst, dy, den, delta, dk_rest, dv, kdk, scale, T, H, Hq, Tp, n,
            D_HEAD=d, DINT=Di, C=chunk, BM=bm, DT=dt_tl, PREC=prec, PART=part,
            RANK1=CHUNK_RANK1, READ_PAIR=_read_pair(d, dt_tl, "dkv", major),
            FUSED=fused, num_warps=_warps(d), num_stages=_stages(d, dt_tl))
    if not fused:
        _state_grad(k, v, bg, den, dSst, dk_rest, dk, kdk, scale, chunk, n, H, False, dt_tl,
                    prec)
    if side is not None:   # dq's outputs, and every buffer it reads, then belong to the caller
        torch.cuda.current_stream(q.device).wait_stream(side)
    return dS0i, dZ0i


def _state_grad(x, a, bg, den, Sst, rest, out, xdx, scale, chunk, n, H, is_q, dt_tl, prec):
    """The state term of dq (is_q) or dk in its own launch (chunked._state_grad): out =
    rest + that term, in x's dtype, with the row sums into xdx."""
    B, T, Hx, d = x.shape
    bm = next(b for b in (GRAD_BLOCK_M, 64, 32, 16) if b <= chunk and chunk % b == 0)
    launch.fitted(chunked._state_grad, (n * chunk // bm, B * Hx),
        x, a, bg, den, Sst, rest, out, xdx, scale, T, H, Hx, n * chunk, n, D_HEAD=d,
        DINT=internal_dim(d), C=chunk, BM=bm, DT=dt_tl, PREC=prec, IS_Q=is_q,
        num_warps=_warps(d), num_stages=_stages(d, dt_tl))


def _stateless(n: int, S0, want_state: bool) -> bool:
    """One chunk, no initial state and no final state asked for: no state is ever built or
    read (the kernels run the plain attention form)."""
    return n == 1 and S0 is None and not want_state


@_fwd_op.register_fake
def _fwd_fake(q, k, v, log_g, S0, z0, scale, chunk, keep_states=True, want_state=True):
    B, T, Hq, d = q.shape
    H = k.shape[2]
    D = math.comb(d + 1, 2)
    f32 = torch.float32
    n = triton.cdiv(T, chunk)
    if keep_states and not _stateless(n, S0, want_state):
        Sst = q.new_empty(B * H, n, internal_dim(d), d, dtype=_dot_types(q.dtype)[1])
        Zst = q.new_empty(B * H, n, d, d, dtype=f32)
    else:
        Sst, Zst = q.new_empty(0, dtype=_dot_types(q.dtype)[1]), q.new_empty(0, dtype=f32)
    if want_state:
        S, z = q.new_empty(B, H, D, d, dtype=f32), q.new_empty(B, H, D, dtype=f32)
    else:
        S, z = q.new_empty(0, dtype=f32), q.new_empty(0, dtype=f32)
    return torch.empty_like(q), q.new_empty(B, Hq, T, dtype=f32), S, z, Sst, Zst


@torch.library.custom_op("retention::triton_power_retention_bwd", mutates_args=())
def _bwd_op(dy: torch.Tensor, dS: Optional[torch.Tensor], dz: Optional[torch.Tensor],
            q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_g: torch.Tensor,
            S0: Optional[torch.Tensor], z0: Optional[torch.Tensor], y: torch.Tensor,
            den: torch.Tensor, S: torch.Tensor, z: torch.Tensor, Sst: torch.Tensor,
            Zst: torch.Tensor, scale: float, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                       torch.Tensor]:
    """dq, dk, dv, dlog_g, dS0, dz0 (the last two empty when there was no initial state)."""
    B, T, Hq, d = q.shape
    H = k.shape[2]
    q, k, v, dy = q.contiguous(), k.contiguous(), v.contiguous(), dy.contiguous()
    n = triton.cdiv(T, chunk)
    dt_tl, dt_torch, prec = _dot_types(q.dtype)
    Di = internal_dim(d)
    has_dS = dS is not None or dz is not None
    has_state = not _stateless(n, S0, has_dS)
    bg = _chunk_gates(log_g, chunk, n) if has_state else None
    if has_state and Sst.numel() == 0:   # not kept (RETENTION_TRITON_RECOMPUTE=1)
        Sst, Zst, _, _ = _forward_states(k, v, bg, S0, z0, chunk, n, T, Hq, scale, dt_tl,
                                         dt_torch, prec, False)
    # Gates: by degree-2 homogeneity the output depends on G only through q e^{G/2} and
    # k e^{-G/2} (and the final state's e^{G_T}), so dG_i = (q_i.dq_i - k_i.dk_i) / 2; the
    # kernels write the row sums with the gradients (in the input dtype).
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    qdq = torch.empty(B, Hq, T, device=q.device, dtype=torch.float32)
    kdk = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    if not has_state:   # (no initial state, no state gradient)
        _attention_bwd(q, k, v, log_g, dy, y.contiguous(), den, dq, dk, dv, qdq, kdk, scale,
                       dt_tl, prec)
    else:
        bt = max(16, 4096 // d)   # rows per row-wise program: a [bt, d] float32 tile of 4096
        delta = torch.empty(B, Hq, T, device=q.device, dtype=torch.float32)
        rowwise._row_delta[(triton.cdiv(T, bt), B * Hq)](dy, y.contiguous(), delta, T, Hq,
                                                         D_HEAD=d, BT=bt)
        if has_dS:
            dS = torch.zeros_like(S) if dS is None else dS
            dz = torch.zeros_like(z) if dz is None else dz
            dSi, dZi = _internal_state(dS.float(), dz.float(), B, H)
        dS0i, dZ0i = _chunked_bwd(q, k, v, bg, dy, den, delta, Sst, Zst,
                                  dSi if has_dS else None, dZi if has_dS else None, dq, dk, dv,
                                  qdq, kdk, scale, chunk, S0 is not None, dt_tl, dt_torch, prec)
    last = ((dS.float() * S).sum((-1, -2)) + (dz.float() * z).sum(-1)).contiguous() \
        if has_dS else None
    dlog_g = _log_gate_grad(qdq, kdk, last)
    if S0 is not None:
        dS0, dz0 = to_canonical(dS0i.view(B, H, Di, d), dZ0i.view(B, H, d, d))
    else:
        dS0, dz0 = q.new_empty(0, dtype=torch.float32), q.new_empty(0, dtype=torch.float32)
    return dq, dk, dv, dlog_g, dS0, dz0


@_bwd_op.register_fake
def _bwd_fake(dy, dS, dz, q, k, v, log_g, S0, z0, y, den, S, z, Sst, Zst, scale, chunk):
    f32 = torch.float32
    dS0 = torch.empty_like(S0, dtype=f32) if S0 is not None else q.new_empty(0, dtype=f32)
    dz0 = torch.empty_like(z0, dtype=f32) if z0 is not None else q.new_empty(0, dtype=f32)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(log_g, dtype=f32), dS0, dz0)


def _setup_context(ctx, inputs, output):
    q, k, v, log_g, S0, z0, scale, chunk, _, want_state = inputs
    y, den, S, z, Sst, Zst = output
    ctx.save_for_backward(q, k, v, log_g, S0, z0, y, den, S, z, Sst, Zst)
    ctx.scale, ctx.chunk = scale, chunk
    ctx.has_S0 = S0 is not None
    ctx.want_state = want_state
    # Outputs nobody differentiates (den, the per-chunk states: 1.3 GB at 64k x 16 heads)
    # get None, not a zero-filled gradient allocated and written on every backward.
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, dden, dS, dz, dSst, dZst):
    q, k, v, log_g, S0, z0, y, den, S, z, Sst, Zst = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(y)
    if not ctx.want_state:   # S and z were empty placeholders
        dS = dz = None
    dq, dk, dv, dlog_g, dS0, dz0 = torch.ops.retention.triton_power_retention_bwd(
        dy, dS, dz, q, k, v, log_g, S0, z0, y, den, S, z, Sst, Zst, ctx.scale, ctx.chunk)
    if not ctx.has_S0:
        dS0 = dz0 = None
    return dq, dk, dv, dlog_g, dS0, dz0, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _check_supported(d, *dtypes):
    """Valid inputs the kernels do not cover raise NotImplementedError (the dispatcher then
    falls back to the ops path)."""
    if d not in (16, 32, 64, 128):
        # Tiles span the whole head dim (power-of-two shapes); 256 would not fit on chip.
        raise NotImplementedError(f"the Triton kernels take head dims 16, 32, 64 and 128, "
                                  f"got {d}")
    if len(set(dtypes)) != 1 or dtypes[0] not in (torch.float32, torch.float16, torch.bfloat16):
        raise NotImplementedError(f"the Triton kernels take one dtype among float32, float16 "
                                  f"and bfloat16 for q, k, v; got {dtypes}")


def power_retention(q_BTQd, k_BTHd, v_BTHd, log_g_BTH=None, *, degree: int = 2,
                    scale: float | None = None, chunk_size: int | None = None,
                    initial_state=None, return_state: bool = False):
    """Chunked power retention on the Triton kernels; same contract as reference.power_retention.

    Returns y [B,T,Hq,d] (q's dtype), or (y, (S [B,H,D,d], z [B,H,D])) with the final state in
    the canonical layout, float32. Differentiable in q, k, v, log_g and the initial state.
    """
    if degree != 2:
        raise NotImplementedError(f"the Triton kernels implement degree 2, got {degree}")
    if q_BTQd.ndim != 4 or k_BTHd.shape != v_BTHd.shape or k_BTHd.ndim != 4 \
            or q_BTQd.shape[:2] != k_BTHd.shape[:2] or q_BTQd.shape[3] != k_BTHd.shape[3]:
        raise ValueError(f"expected q [B,T,Hq,d], k and v [B,T,H,d]; got {tuple(q_BTQd.shape)}, "
                         f"{tuple(k_BTHd.shape)}, {tuple(v_BTHd.shape)}")
    B, T, Hq, d = q_BTQd.shape
    H = k_BTHd.shape[2]
    if Hq % H:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({H})")
    _check_supported(d, q_BTQd.dtype, k_BTHd.dtype, v_BTHd.dtype)
    if B * Hq > MAX_GRID_Y:   # e.g. a batched prefill of many short prompts
        return _in_batch_slices(q_BTQd, k_BTHd, v_BTHd, log_g_BTH, scale, chunk_size,
                                initial_state, return_state)
    if log_g_BTH is None:
        log_g_BTH = q_BTQd.new_zeros(B, T, H, dtype=torch.float32)
    elif tuple(log_g_BTH.shape) != (B, T, H):
        raise ValueError(f"log_g must have shape [B,T,H] = {(B, T, H)}, got {tuple(log_g_BTH.shape)}")
    forward_only = not (torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (q_BTQd, k_BTHd, v_BTHd, log_g_BTH, *(initial_state or ()))))
    chunk = kernel_chunk(T, chunk_size, d, initial_state is None and not return_state,
                         forward_only)
    if chunk % 16 or chunk < 16:
        raise ValueError(f"chunk_size must be a positive multiple of 16, got {chunk}")
    S0 = z0 = None
    if initial_state is not None:
        D = math.comb(d + 1, 2)
        S0, z0 = initial_state
        if tuple(S0.shape) != (B, H, D, d) or tuple(z0.shape) != (B, H, D):
            raise ValueError(f"initial_state must be (S [B,H,D,d], z [B,H,D]) = "
                             f"({(B, H, D, d)}, {(B, H, D)}), got ({tuple(S0.shape)}, "
                             f"{tuple(z0.shape)})")
        S0, z0 = S0.float(), z0.float()
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    # The backward reuses the forward's per-chunk states (Di*d per chunk and head: 2560 x 64
    # in bf16 per 256 tokens at d=64) unless RETENTION_TRITON_RECOMPUTE=1 trades time for memory.
    keep = os.environ.get("RETENTION_TRITON_RECOMPUTE", "0") != "1"
    y, _, S, z, _, _ = torch.ops.retention.triton_power_retention_fwd(
        q_BTQd, k_BTHd, v_BTHd, log_g_BTH.float(), S0, z0, scale, chunk, keep, return_state)
    return (y, (S, z)) if return_state else y


def _in_batch_slices(q, k, v, log_g, scale, chunk_size, initial_state, return_state):
    """power_retention over slices of the batch small enough for the grid, concatenated (each
    sequence's result is the same as in one call)."""
    step = max(1, MAX_GRID_Y // q.shape[2])
    ys, Ss, zs = [], [], []
    for i in range(0, q.shape[0], step):
        part = slice(i, i + step)
        out = power_retention(
            q[part], k[part], v[part], None if log_g is None else log_g[part], scale=scale,
            chunk_size=chunk_size, return_state=return_state,
            initial_state=None if initial_state is None else tuple(a[part] for a in initial_state))
        y, (S, z) = out if return_state else (out, (None, None))
        ys.append(y)
        Ss.append(S)
        zs.append(z)
    y = torch.cat(ys)
    return (y, (torch.cat(Ss), torch.cat(zs))) if return_state else y


@lru_cache(maxsize=None)
def _canonical_tables_cpu(d: int):
    from retention.reference import feature_index

    tuples, weights = feature_index(d, 2)
    return (torch.as_tensor(np.ascontiguousarray(tuples[:, 0]), dtype=torch.int32),
            torch.as_tensor(np.ascontiguousarray(tuples[:, 1]), dtype=torch.int32),
            torch.as_tensor(weights, dtype=torch.float32))


@torch.library.custom_op("retention::triton_power_retention_step", mutates_args=())
def _step_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_g: torch.Tensor,
             S: torch.Tensor, z: torch.Tensor, scale: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, Hq, d = q.shape
    H = k.shape[1]
    D = S.shape[2]
    ii, jj, wt = (t.to(q.device) for t in _canonical_tables_cpu(d))
    S_new = torch.empty_like(S)
    z_new = torch.empty_like(z)
    y = torch.empty_like(q)
    bv = min(d, 32)
    decode._step[(B * H, d // bv)](
        q.contiguous(), k.contiguous(), v.contiguous(), log_g.float().contiguous(),
        S.contiguous(), z.contiguous(), S_new, z_new, y, ii, jj, wt, scale, H, Hq, D,
        D_HEAD=d, RGP=triton.next_power_of_2(Hq // H), BF=64, BV=bv, num_warps=4)
    return y, S_new, z_new


@_step_op.register_fake
def _step_fake(q, k, v, log_g, S, z, scale):
    return torch.empty_like(q), torch.empty_like(S), torch.empty_like(z)


def power_retention_step(q_BQd, k_BHd, v_BHd, log_g_BH=None, state=None, *, degree: int = 2,
                         scale: float | None = None):
    """One decode token: y [B,Hq,d] and the new state (S [B,H,D,d], z [B,H,D]) float32.
    state None means an empty state."""
    if degree != 2:
        raise NotImplementedError(f"the Triton decode kernel implements degree 2, got {degree}")
    if q_BQd.ndim != 3 or k_BHd.ndim != 3:
        raise ValueError(f"expected q [B,Hq,d], k and v [B,H,d]; got {tuple(q_BQd.shape)}, "
                         f"{tuple(k_BHd.shape)}, {tuple(v_BHd.shape)}")
    B, Hq, d = q_BQd.shape
    H = k_BHd.shape[1]
    if k_BHd.shape != v_BHd.shape or k_BHd.shape[0] != B or k_BHd.shape[2] != d or Hq % H:
        raise ValueError(f"expected q [B,Hq,d], k and v [B,H,d] with Hq a multiple of H; got "
                         f"{tuple(q_BQd.shape)}, {tuple(k_BHd.shape)}, {tuple(v_BHd.shape)}")
    _check_supported(d, q_BQd.dtype, k_BHd.dtype, v_BHd.dtype)
    D = math.comb(d + 1, 2)
    if state is None:
        state = (q_BQd.new_zeros(B, H, D, d, dtype=torch.float32),
                 q_BQd.new_zeros(B, H, D, dtype=torch.float32))
    S, z = state
    if tuple(S.shape) != (B, H, D, d) or tuple(z.shape) != (B, H, D):
        raise ValueError(f"state must be (S [B,H,D,d], z [B,H,D]) = ({(B, H, D, d)}, "
                         f"{(B, H, D)}), got ({tuple(S.shape)}, {tuple(z.shape)})")
    if log_g_BH is None:
        log_g_BH = q_BQd.new_zeros(B, H, dtype=torch.float32)
    elif tuple(log_g_BH.shape) != (B, H):
        raise ValueError(f"log_g must have shape [B,H] = {(B, H)}, got {tuple(log_g_BH.shape)}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    y, S, z = torch.ops.retention.triton_power_retention_step(
        q_BQd, k_BHd, v_BHd, log_g_BH, S.float(), z.float(), scale)
    return y, (S, z)
