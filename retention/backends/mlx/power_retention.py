"""Power retention on MLX (DESIGN section 1): the plain-ops chunked form, differentiable by MLX
autodiff; the one-token recurrent step; and the dispatcher with a slot for the Metal kernel.

Shapes: q_BTQd [B,T,Hq,d], k_BTHd / v_BTHd [B,T,H,d], log_g_BTH [B,T,H] (<= 0); query head i
reads KV head i // (Hq // H). State: S_BHDd [B,H,D,d], z_BHD [B,H,D] float32, in the canonical
feature layout of retention.reference.feature_index. Inside the chunked form, N = chunks,
c = chunk size, R = Hq // H query heads per KV head.
"""
from __future__ import annotations

import logging
import math
import warnings
from functools import lru_cache

import mlx.core as mx

from retention.reference import feature_dim, feature_index
from retention.shapes import check_retention_inputs, check_state_shapes

logger = logging.getLogger("retention")

DEFAULT_CHUNK_SIZE = 128
IMPLS = ("auto", "kernel", "ops")


# --- feature map -------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _feature_weights(d: int, degree: int, dtype: mx.Dtype):
    """sqrt-multinomial weights [D] of the canonical layout (retention.reference)."""
    return mx.array(feature_index(d, degree)[1], dtype=dtype)


def phi(x, degree: int = 2):
    """Symmetric power features of the last axis: phi(q) . phi(k) == (q . k) ** degree.

    Canonical layout (non-decreasing index tuples in lexicographic order) built from slices,
    not a gather: tuples of length k that start at i are x_i times the tuples of length k-1
    over indices >= i, which are a suffix of the previous level. A gather's backward is a
    scatter-add, which made MLX's CPU backward 5x slower.
    """
    d = x.shape[-1]
    monomials = x
    for k in range(2, degree + 1):
        total = math.comb(d + k - 2, k - 1)   # tuples of length k-1
        monomials = mx.concatenate(
            [x[..., i:i + 1] * monomials[..., total - math.comb(d - i + k - 2, k - 1):]
             for i in range(d)], axis=-1)
    return monomials * _feature_weights(d, degree, x.dtype)


# --- helpers -----------------------------------------------------------------------------

def _compute_dtype(dtype: mx.Dtype) -> mx.Dtype:
    # bf16/f16 inputs are computed in float32; float64 stays (CPU only, used by gradient tests).
    return mx.float64 if dtype == mx.float64 else mx.float32


def _check_inputs(q, k, v, log_g, degree, chunk_size):
    check_retention_inputs(q.shape, k.shape, v.shape, None if log_g is None else log_g.shape,
                           degree, chunk_size)


def _initial_state(initial_state, B, H, D, d, dtype):
    if initial_state is None:
        return mx.zeros((B, H, D, d), dtype=dtype), mx.zeros((B, H, D), dtype=dtype)
    S, z = initial_state
    check_state_shapes(S.shape, z.shape, B, H, D, d)
    return S.astype(dtype), z.astype(dtype)


def _state_dtype(compute_dtype):
    return mx.float64 if compute_dtype == mx.float64 else mx.float32


# --- the chunked form in plain MLX ops ---------------------------------------------------

def power_retention_ops(q_BTQd, k_BTHd, v_BTHd, log_g_BTH=None, *, degree: int = 2,
                        scale: float | None = None, chunk_size: int | None = None,
                        initial_state=None, return_state: bool = False):
    """Chunked gated power retention; y [B,T,Hq,d] in q's dtype, optionally (y, (S, z)).

    Inside a chunk: log-space weights p*log|scale q.k| + b_i - b_j (b = gate cumsum since the
    chunk start). Across chunks: a carried state (S, z), keys discounted to the chunk end.
    Both parts share the per-row scale alpha = max(row max, log state denominator).
    """
    _check_inputs(q_BTQd, k_BTHd, v_BTHd, log_g_BTH, degree, chunk_size)
    B, T, Hq, d = q_BTQd.shape
    H = k_BTHd.shape[2]
    R, D, p = Hq // H, feature_dim(d, degree), degree
    c = int(chunk_size or DEFAULT_CHUNK_SIZE)
    if c <= 0:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    out_dtype = q_BTQd.dtype
    dt = _compute_dtype(out_dtype)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    S, z = _initial_state(initial_state, B, H, D, d, dt)

    q, k, v = (a.astype(dt) for a in (q_BTQd, k_BTHd, v_BTHd))
    log_g = mx.zeros((B, T, H), dtype=dt) if log_g_BTH is None else log_g_BTH.astype(dt)
    # Pad T to whole chunks: padded keys are zero (phi(0) = 0, nothing enters the state),
    # padded gates are zero (no decay), padded query rows are dropped at the end.
    N = -(-T // c)
    pad = N * c - T
    if pad:
        q, k, v = (mx.pad(a, [(0, 0), (0, pad), (0, 0), (0, 0)]) for a in (q, k, v))
        log_g = mx.pad(log_g, [(0, 0), (0, pad), (0, 0)])

    q_BNHRcd = (q * scale).reshape(B, N, c, H, R, d).transpose(0, 1, 3, 4, 2, 5)
    k_BNHcd = k.reshape(B, N, c, H, d).transpose(0, 1, 3, 2, 4)
    v_BNHcd = v.reshape(B, N, c, H, d).transpose(0, 1, 3, 2, 4)
    b_BNHc = mx.cumsum(log_g.reshape(B, N, c, H), axis=2).transpose(0, 1, 3, 2)

    # Chunk states: keys discounted to the chunk end (before phi, which is p-homogeneous, so
    # the discount costs d multiplies per key instead of D), then a scan across chunks.
    discount_BNHc = mx.exp((b_BNHc[..., -1:] - b_BNHc) / p)
    fk_BNHcD = phi(k_BNHcd * discount_BNHc[..., None], p)
    dS_BNHDd = fk_BNHcD.swapaxes(-1, -2) @ v_BNHcd
    dz_BNHD = fk_BNHcD.sum(axis=-2)
    total_BNH = mx.exp(b_BNHc[..., -1])
    starts_S, starts_z = [], []
    for n in range(N):
        starts_S.append(S)
        starts_z.append(z)
        S = total_BNH[:, n, :, None, None] * S + dS_BNHDd[:, n]
        z = total_BNH[:, n, :, None] * z + dz_BNHD[:, n]
    S_BNHDd = mx.stack(starts_S, axis=1)
    z_BNHD = mx.stack(starts_z, axis=1)

    # Queries read the state at their chunk start (unscaled here; alpha rescales below).
    fq_BNHRcD = phi(q_BNHRcd, p)
    fq_BNHxD = fq_BNHRcD.reshape(B, N, H, R * c, D)
    state_num_BNHRcd = (fq_BNHxD @ S_BNHDd).reshape(B, N, H, R, c, d)
    state_den_BNHRc = (fq_BNHxD @ z_BNHD[..., None]).reshape(B, N, H, R, c)

    # Intra-chunk log weights; zero scores (padding, exact zeros) get weight 0 without log(0).
    x_BNHRcc = q_BNHRcd @ k_BNHcd[:, :, :, None].swapaxes(-1, -2)
    causal_cc = mx.tril(mx.ones((c, c), dtype=mx.bool_))
    valid = causal_cc & (x_BNHRcc != 0)
    gap_BNH1cc = b_BNHc[:, :, :, None, :, None] - b_BNHc[:, :, :, None, None, :]
    log_x = mx.log(mx.abs(mx.where(valid, x_BNHRcc, 1)))
    log_w = mx.where(valid, p * log_x + mx.where(causal_cc, gap_BNH1cc, 0), -mx.inf)

    # alpha: the common per-row scale; a pure shift that cancels, so it carries no gradient.
    b_BNH1c = b_BNHc[:, :, :, None, :]
    row_max = mx.max(mx.stop_gradient(log_w), axis=-1)
    den_sg = mx.stop_gradient(state_den_BNHRc)
    log_state_den = mx.where(den_sg > 0, mx.log(mx.where(den_sg > 0, den_sg, 1)) + b_BNH1c,
                             -mx.inf)
    alpha = mx.maximum(row_max, log_state_den)
    alpha = mx.stop_gradient(mx.where(alpha == -mx.inf, 0, alpha))

    w_BNHRcc = mx.exp(log_w - alpha[..., None])
    state_scale = mx.exp(b_BNH1c - alpha)
    num = w_BNHRcc @ v_BNHcd[:, :, :, None] + state_num_BNHRcd * state_scale[..., None]
    den = w_BNHRcc.sum(axis=-1) + state_den_BNHRc * state_scale
    if pad:  # padded rows have no weights at all: keep them finite so gradients stay clean
        is_pad = (mx.arange(N * c) >= T).reshape(N, c)[None, :, None, None, :]
        den = den + is_pad.astype(dt)
    y_BNHRcd = num / den[..., None]
    y = y_BNHRcd.transpose(0, 1, 4, 2, 3, 5).reshape(B, N * c, Hq, d)[:, :T].astype(out_dtype)
    if not return_state:
        return y
    sdt = _state_dtype(dt)
    return y, (S.astype(sdt), z.astype(sdt))


def power_retention_step_ops(q_BQd, k_BHd, v_BHd, log_g_BH=None, state=None, *,
                             degree: int = 2, scale: float | None = None):
    """One recurrent token: S = g S + phi(k) v^T, z = g z + phi(k), y = phi(q).S / phi(q).z.

    Returns (y [B,Hq,d] in q's dtype, (S [B,H,D,d], z [B,H,D]) float32); state None = zeros.
    """
    if degree < 2 or degree % 2:
        raise ValueError(f"degree must be an even integer >= 2, got {degree}")
    if q_BQd.ndim != 3 or k_BHd.shape != v_BHd.shape or k_BHd.ndim != 3 \
            or q_BQd.shape[0] != k_BHd.shape[0] or q_BQd.shape[2] != k_BHd.shape[2]:
        raise ValueError(f"expected q [B,Hq,d], k and v [B,H,d]; got {q_BQd.shape}, "
                         f"{k_BHd.shape}, {v_BHd.shape}")
    B, Hq, d = q_BQd.shape
    H = k_BHd.shape[1]
    if Hq % H:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({H})")
    R, D = Hq // H, feature_dim(d, degree)
    out_dtype = q_BQd.dtype
    dt = _compute_dtype(out_dtype)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    S, z = _initial_state(state, B, H, D, d, dt)
    q, k, v = (a.astype(dt) for a in (q_BQd, k_BHd, v_BHd))
    if log_g_BH is None:
        g_BH = mx.ones((B, H), dtype=dt)
    else:
        if tuple(log_g_BH.shape) != (B, H):
            raise ValueError(f"log_g must have shape [B,H] = {(B, H)}, got {log_g_BH.shape}")
        g_BH = mx.exp(log_g_BH.astype(dt))

    fk_BHD = phi(k, degree)
    S = g_BH[..., None, None] * S + fk_BHD[..., None] * v[:, :, None, :]
    z = g_BH[..., None] * z + fk_BHD
    fq_BHRD = phi(q * scale, degree).reshape(B, H, R, D)
    num_BHRd = fq_BHRD @ S
    den_BHR1 = fq_BHRD @ z[..., None]
    y = (num_BHRd / den_BHR1).reshape(B, Hq, d).astype(out_dtype)
    sdt = _state_dtype(dt)
    return y, (S.astype(sdt), z.astype(sdt))


# --- dispatcher --------------------------------------------------------------------------

# Slots for the Metal kernels (a later issue builds them from kernels/metal with
# mx.fast.metal_kernel): callables with the ops twins' signatures, or None.
metal_power_retention = None
metal_power_retention_step = None

_resolved: dict[tuple[str, str], str] = {}


def _device_of(device_or_array) -> mx.Device:
    # MLX arrays carry no device: they run on the default device (or a stream's).
    if isinstance(device_or_array, mx.Device):
        return device_or_array
    return mx.default_device()


def kernel_available(device_or_array=None) -> bool:
    """Whether the Metal kernel exists and can run on this device."""
    device = _device_of(device_or_array)
    return (metal_power_retention is not None and mx.metal.is_available()
            and device.type == mx.DeviceType.gpu)


def resolve_impl(impl: str = "auto", device_or_array=None) -> str:
    """"kernel" or "ops" for `impl` on this device; logs the choice once, warns on fallback."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    device = _device_of(device_or_array)
    key = (impl, str(device))
    if key in _resolved:
        return _resolved[key]
    choice = "kernel" if impl != "ops" and kernel_available(device) else "ops"
    if impl == "kernel" and choice == "ops":
        if metal_power_retention is None:
            reason = "no Metal power-retention kernel is built yet"
        elif not mx.metal.is_available():
            reason = "Metal is not available on this machine"
        else:
            reason = f"the default device is {device}, not the GPU"
        warnings.warn(f"power_retention(impl='kernel'): {reason}; falling back to the "
                      f"plain MLX ops path", RuntimeWarning, stacklevel=3)
    logger.info("retention: mlx power_retention impl=%r on %s runs the %s path",
                impl, device, "Metal kernel" if choice == "kernel" else "MLX ops")
    _resolved[key] = choice
    return choice


def power_retention(q, k, v, log_g=None, *, degree: int = 2, scale: float | None = None,
                    chunk_size: int | None = None, initial_state=None,
                    return_state: bool = False, impl: str = "auto"):
    """Gated power retention on MLX arrays; `impl` picks the Metal kernel or the ops path."""
    fn = power_retention_ops
    if resolve_impl(impl, q) == "kernel" and q.dtype != mx.float64:
        fn = metal_power_retention
    return fn(q, k, v, log_g, degree=degree, scale=scale, chunk_size=chunk_size,
              initial_state=initial_state, return_state=return_state)


def power_retention_step(q_BQd, k_BHd, v_BHd, log_g_BH=None, state=None, *, degree: int = 2,
                         scale: float | None = None, impl: str = "auto"):
    """One recurrent token -> (y [B,Hq,d], (S, z)); the Metal kernel when there is one."""
    fn = power_retention_step_ops
    if resolve_impl(impl, q_BQd) == "kernel" and metal_power_retention_step is not None \
            and q_BQd.dtype != mx.float64:
        fn = metal_power_retention_step
    return fn(q_BQd, k_BHd, v_BHd, log_g_BH, state, degree=degree, scale=scale)
