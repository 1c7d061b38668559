"""Power retention on torch: the plain-ops chunked form, the one-token recurrent step, and the
dispatcher that picks the Triton kernel on CUDA (DESIGN sections 1 and 4).

Shapes: q_BTQd [B,T,Hq,d], k_BTHd / v_BTHd [B,T,H,d], log_g_BTH [B,T,H] (<= 0), Q = Hq,
R = Hq // H query heads per KV head, N chunks of c tokens, D = C(d+p-1, p) features.
State at the API: (S_BHDd [B,H,D,d], z_BHD [B,H,D]) float32, canonical feature layout.
Inside, S and z travel together as one [.., D, d+1] matrix: v gets a column of ones, so one
matmul yields numerator and denominator.
"""
from __future__ import annotations

import importlib
import logging
import math
import os
import warnings
from functools import lru_cache

import torch

from retention.reference import feature_dim, feature_index
from retention.shapes import check_retention_inputs, check_state_shapes

logger = logging.getLogger("retention")

IMPLS = ("auto", "kernel", "ops")
DEFAULT_CHUNK_SIZE = 128


# --- feature map ------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _feature_tensors(d: int, degree: int, device: torch.device, dtype: torch.dtype):
    tuples, weights = feature_index(d, degree)
    # Built outside inference mode: a cached inference tensor could never enter autograd later.
    with torch.inference_mode(False):
        index_pD = torch.as_tensor(tuples.T.copy(), device=device)
        return index_pD, torch.as_tensor(weights, dtype=dtype, device=device)


def phi(x: torch.Tensor, degree: int = 2) -> torch.Tensor:
    """Symmetric power features over the last axis: phi(q) . phi(k) == (q . k) ** degree."""
    index_pD, weight_D = _feature_tensors(x.shape[-1], degree, x.device, x.dtype)
    out = x.index_select(-1, index_pD[0]) * weight_D
    for t in range(1, degree):
        out = out * x.index_select(-1, index_pD[t])
    return out


# --- input checks ----------------------------------------------------------------------

def _check(q, k, v, log_g, degree, chunk_size):
    check_retention_inputs(q.shape, k.shape, v.shape, None if log_g is None else log_g.shape,
                           degree, chunk_size)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # bf16/f16 inputs are computed in float32; float64 stays float64 (gradient checks).
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _state_aug(state, B, H, D, d, dtype, device) -> torch.Tensor:
    """(S [B,H,D,d], z [B,H,D]) -> [B,H,D,d+1]; None -> zeros."""
    if state is None:
        return torch.zeros(B, H, D, d + 1, dtype=dtype, device=device)
    S, z = state
    check_state_shapes(S.shape, z.shape, B, H, D, d)
    return torch.cat([S.to(dtype), z.to(dtype).unsqueeze(-1)], dim=-1)


def _split_state(aug: torch.Tensor):
    """[B,H,D,d+1] -> (S, z): float32, or float64 when computing in float64."""
    d = aug.shape[-1] - 1
    return aug[..., :d].contiguous(), aug[..., d].contiguous()


# --- chunked ops form -------------------------------------------------------------------

def _intra_log_weights(q_BHNRcd, k_BHNcd, b_BHNc, p):
    """log w_ij = p*log|q_i.k_j| + b_i - b_j inside each chunk; -inf above the diagonal and
    where q.k == 0 (double where, so log|0| never reaches the backward pass)."""
    B, H, N, R, c, d = q_BHNRcd.shape
    s = (q_BHNRcd.reshape(B, H, N, R * c, d) @ k_BHNcd.transpose(-1, -2)).view(B, H, N, R, c, c)
    causal = torch.ones(c, c, dtype=torch.bool, device=s.device).tril()
    keep = causal & (s != 0)
    log_s = torch.log(torch.where(keep, s.abs(), torch.ones_like(s)))
    gate_ij = b_BHNc[:, :, :, None, :, None] - b_BHNc[:, :, :, None, None, :]
    return torch.where(keep, p * log_s + gate_ij, torch.full_like(s, -math.inf))


def _carry_states(k_BHncd, v_BHnce, b_BHnc, state0, p):
    """Start state of each of the n chunks (a list) and the state after the last one.

    Keys enter discounted to their chunk's end, exp(b_last - b_j); the carried state decays by
    the chunk's total gate exp(b_last). Only this carry loops over chunks."""
    B, H, n, c, d = k_BHncd.shape
    b_last = b_BHnc[..., -1:]
    disc = torch.exp(b_last - b_BHnc).unsqueeze(-1)
    upd_BHnDe = phi(k_BHncd, p).transpose(-1, -2) @ (disc * v_BHnce)
    total_BHn = torch.exp(b_last[..., 0])
    carry = state0
    if carry is None:
        carry = torch.zeros(B, H, upd_BHnDe.shape[-2], v_BHnce.shape[-1], dtype=k_BHncd.dtype,
                            device=k_BHncd.device)
    starts = []
    for i in range(n):
        starts.append(carry)
        carry = total_BHn[:, :, i, None, None] * carry + upd_BHnDe[:, :, i]
    return starts, carry


def power_retention_ops(q_BTQd, k_BTHd, v_BTHd, log_g_BTH=None, *, degree: int = 2,
                        scale: float | None = None, chunk_size: int | None = None,
                        initial_state=None, return_state: bool = False):
    """Chunked gated power retention in plain torch ops (differentiable by autograd).

    Inside a chunk: the attention form in log space, p*log|scale q.k| + b_i - b_j (b = gate
    cumsum since the chunk start). Across chunks: the carried state, read by queries discounted
    by exp(b_i). Both parts share one per-row scale alpha = max(row max, log state denominator)
    so nothing overflows; alpha cancels in the ratio, so it carries no gradient.
    """
    _check(q_BTQd, k_BTHd, v_BTHd, log_g_BTH, degree, chunk_size)
    out_dtype = q_BTQd.dtype
    B, T, Hq, d = q_BTQd.shape
    H = k_BTHd.shape[2]
    R, D, p = Hq // H, feature_dim(d, degree), degree
    cdt, device = _compute_dtype(q_BTQd), q_BTQd.device
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if T == 0:  # nothing to read; the state passes through unchanged
        y = q_BTQd.new_zeros(q_BTQd.shape)
        if not return_state:
            return y
        aug = _state_aug(initial_state, B, H, D, d, cdt, device)
        return y, _split_state(aug)
    c = min(chunk_size or DEFAULT_CHUNK_SIZE, T)
    N = -(-T // c)
    pad = N * c - T
    state0 = None if initial_state is None else _state_aug(initial_state, B, H, D, d, cdt, device)

    # Padded keys are zero (phi(0) = 0) and padded gates are 0, so the carried state is exact;
    # padded query rows are dropped at the end.
    q = q_BTQd.to(cdt) * scale
    k, v = k_BTHd.to(cdt), v_BTHd.to(cdt)
    log_g = (torch.zeros(B, T, H, dtype=cdt, device=device) if log_g_BTH is None
             else log_g_BTH.to(cdt))
    if pad:
        q = torch.nn.functional.pad(q, (0, 0, 0, 0, 0, pad))
        k = torch.nn.functional.pad(k, (0, 0, 0, 0, 0, pad))
        v = torch.nn.functional.pad(v, (0, 0, 0, 0, 0, pad))
        log_g = torch.nn.functional.pad(log_g, (0, 0, 0, pad))
    q_BHNRcd = q.view(B, N, c, H, R, d).permute(0, 3, 1, 4, 2, 5)
    k_BHNcd = k.view(B, N, c, H, d).permute(0, 3, 1, 2, 4)
    v_BHNcd = v.view(B, N, c, H, d).permute(0, 3, 1, 2, 4)
    ones = torch.ones(B, H, N, c, 1, dtype=cdt, device=device)
    v_BHNce = torch.cat([v_BHNcd, ones], dim=-1)                     # e = d + 1: [v | 1]
    b_BHNc = log_g.view(B, N, c, H).permute(0, 3, 1, 2).cumsum(-1)

    logw = _intra_log_weights(q_BHNRcd, k_BHNcd, b_BHNc, p)            # [B,H,N,R,c,c]
    with torch.no_grad():
        alpha_BHNRc = logw.amax(-1)

    # Chunks whose start state is non-zero: all if an initial state is given, else from chunk 1.
    first = 0 if state0 is not None else 1
    state_part, final_aug = None, None
    if N > first or return_state:
        n_upd = N if return_state else N - 1   # chunks whose keys must enter the state
        starts, final_aug = _carry_states(k_BHNcd[:, :, :n_upd], v_BHNce[:, :, :n_upd],
                                          b_BHNc[:, :, :n_upd], state0, p)
        if N > first:
            # The last chunk's start: the carry when n_upd == N - 1, else already in starts.
            S_BHnDe = torch.stack((starts + [final_aug])[first:N], dim=2)
            phi_q = phi(q_BHNRcd[:, :, first:], p)                   # [B,H,n,R,c,D]
            n_q = N - first
            raw = (phi_q.reshape(B, H, n_q, R * c, D) @ S_BHnDe).view(B, H, n_q, R, c, d + 1)
            b_q = b_BHNc[:, :, first:, None, :]
            with torch.no_grad():
                state_den = raw[..., d]
                log_den = torch.where(state_den > 0, torch.log(state_den.clamp_min(1e-38)) + b_q,
                                      torch.full_like(state_den, -math.inf))
                alpha_BHNRc = torch.cat([alpha_BHNRc[:, :, :first],
                                         torch.maximum(alpha_BHNRc[:, :, first:], log_den)], 2)
            state_part = (raw, b_q, state_den > 0)

    with torch.no_grad():
        # Rows with no weight at all (padding, all-zero queries) get alpha 0 instead of -inf.
        alpha_BHNRc = torch.where(torch.isfinite(alpha_BHNRc), alpha_BHNRc,
                                  torch.zeros_like(alpha_BHNRc))
    w = torch.exp(logw - alpha_BHNRc.unsqueeze(-1))
    out_BHNRce = w @ v_BHNce.unsqueeze(3)
    if state_part is not None:
        raw, b_q, has_state = state_part
        # An empty state is read with weight 0 (not exp of a large number times ~0).
        log_read = torch.where(has_state, b_q - alpha_BHNRc[:, :, first:],
                               torch.full_like(raw[..., d], -math.inf))
        read = raw * torch.exp(log_read).unsqueeze(-1)
        out_BHNRce = torch.cat([out_BHNRce[:, :, :first], out_BHNRce[:, :, first:] + read], 2)
    num, den = out_BHNRce[..., :d], out_BHNRce[..., d:]
    den = torch.where(den == 0, torch.ones_like(den), den)  # only empty (padded) rows
    y = (num / den).permute(0, 2, 4, 1, 3, 5).reshape(B, N * c, Hq, d)[:, :T].to(out_dtype)
    if return_state:
        return y, _split_state(final_aug)
    return y


# --- one recurrent token ----------------------------------------------------------------

def _check_step_inputs(q_BQd, k_BHd, v_BHd, log_g_BH, degree):
    if q_BQd.ndim != 3 or k_BHd.shape != v_BHd.shape or k_BHd.ndim != 3 \
            or q_BQd.shape[0] != k_BHd.shape[0] or q_BQd.shape[2] != k_BHd.shape[2]:
        raise ValueError(f"expected q [B,Hq,d], k and v [B,H,d]; got {tuple(q_BQd.shape)}, "
                         f"{tuple(k_BHd.shape)}, {tuple(v_BHd.shape)}")
    if not isinstance(degree, int) or degree < 2 or degree % 2:
        raise ValueError(f"degree must be an even integer >= 2, got {degree!r}")
    B, Hq, d = q_BQd.shape
    H = k_BHd.shape[1]
    if Hq % H:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({H})")
    if log_g_BH is not None and tuple(log_g_BH.shape) != (B, H):
        raise ValueError(f"log_g must have shape [B,H] = {(B, H)}, got {tuple(log_g_BH.shape)}")
    return B, Hq, H, d


def _step_read(q_BQd, k_BHd, v_BHd, log_g_BH, S, z, degree, scale):
    """y [B,Hq,d] of one token against the old state (S, z) (compute dtype) plus its own
    term, and what the update needs: (gate [B,H,1], phi(k) [B,H,D], v [B,H,d])."""
    B, Hq, d = q_BQd.shape
    H = k_BHd.shape[1]
    R, p = Hq // H, degree
    cdt, device = S.dtype, q_BQd.device
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    log_gate = (torch.zeros(B, H, dtype=cdt, device=device) if log_g_BH is None
                else log_g_BH.to(cdt))[..., None]                          # [B,H,1]
    q = q_BQd.to(cdt).view(B, H, R, d) * scale
    k, v = k_BHd.to(cdt), v_BHd.to(cdt)

    phi_q = phi(q, p)                                                       # [B,H,R,D]
    read_num = phi_q @ S                                                    # [B,H,R,d]
    read_den = (phi_q @ z.unsqueeze(-1))[..., 0]                            # [B,H,R]
    s = (q @ k.unsqueeze(-1))[..., 0]                                       # [B,H,R]
    nonzero = s != 0
    log_self = torch.where(nonzero, p * torch.log(torch.where(nonzero, s.abs(),
                                                               torch.ones_like(s))),
                           torch.full_like(s, -math.inf))
    has_state = read_den > 0
    with torch.no_grad():  # common scale of both parts; it cancels in the ratio
        log_read = torch.where(has_state, torch.log(read_den.clamp_min(1e-38)) + log_gate,
                               torch.full_like(s, -math.inf))
        alpha = torch.maximum(log_self, log_read)
        alpha = torch.where(torch.isfinite(alpha), alpha, torch.zeros_like(alpha))
    w_read = torch.exp(torch.where(has_state, log_gate - alpha, torch.full_like(s, -math.inf)))
    w_self = torch.exp(log_self - alpha)
    num = w_read.unsqueeze(-1) * read_num + w_self.unsqueeze(-1) * v[:, :, None]
    den = w_read * read_den + w_self
    y = (num / den.unsqueeze(-1)).reshape(B, Hq, d).to(q_BQd.dtype)
    return y, (torch.exp(log_gate), phi(k, p), v)


def power_retention_step_ops(q_BQd, k_BHd, v_BHd, log_g_BH=None, state=None, *,
                             degree: int = 2, scale: float | None = None):
    """One token: S = g S + phi(k) v^T, z = g z + phi(k), y = phi(q).S / phi(q).z.

    The new token's own term is taken as (scale q.k)^p in score space, like the chunked form
    does inside a chunk: exact when the state is empty, and no cancellation across D features.
    Functional (the given state is left as it was); power_retention_step_ updates in place.
    """
    B, Hq, H, d = _check_step_inputs(q_BQd, k_BHd, v_BHd, log_g_BH, degree)
    D, cdt = feature_dim(d, degree), _compute_dtype(q_BQd)
    if state is None:
        S = torch.zeros(B, H, D, d, dtype=cdt, device=q_BQd.device)
        z = torch.zeros(B, H, D, dtype=cdt, device=q_BQd.device)
    else:
        S, z = state
        check_state_shapes(S.shape, z.shape, B, H, D, d)
        S, z = S.to(cdt), z.to(cdt)
    y, (g_BH1, phi_k, v) = _step_read(q_BQd, k_BHd, v_BHd, log_g_BH, S, z, degree, scale)
    # Same arithmetic as the in-place update below, so both give the same bits.
    S_new = (S * g_BH1[..., None]).addcmul_(phi_k.unsqueeze(-1), v.unsqueeze(-2))
    z_new = (z * g_BH1).add_(phi_k)
    return y, (S_new, z_new)


def _step_ops_(q_BQd, k_BHd, v_BHd, log_g_BH, S, z, degree, scale):
    y, (g_BH1, phi_k, v) = _step_read(q_BQd, k_BHd, v_BHd, log_g_BH, S, z, degree, scale)
    S.mul_(g_BH1[..., None]).addcmul_(phi_k.unsqueeze(-1), v.unsqueeze(-2))
    z.mul_(g_BH1).add_(phi_k)
    return y


@lru_cache(maxsize=None)
def _decode_tables(d: int, device: torch.device):
    """(i, j, weight) of each canonical degree-2 feature, on `device`, for the decode kernel;
    cached so a captured CUDA graph never copies them from the host."""
    tuples, weights = feature_index(d, 2)
    with torch.inference_mode(False):
        return (torch.as_tensor(tuples[:, 0].copy(), dtype=torch.int32, device=device),
                torch.as_tensor(tuples[:, 1].copy(), dtype=torch.int32, device=device),
                torch.as_tensor(weights, dtype=torch.float32, device=device))


def _step_kernel_(q_BQd, k_BHd, v_BHd, log_g_BH, S, z, degree, scale):
    """The Triton decode kernel writing the new S over the old one. Each program reads and
    writes only its own S tiles, but every value tile reads all of z, so z is read from a
    copy (B*H*D floats, small) and written in place."""
    if degree != 2:
        raise NotImplementedError(f"the Triton decode kernel implements degree 2, got {degree}")
    B, Hq, d = q_BQd.shape
    H, D = k_BHd.shape[1], S.shape[2]
    if d % 16 or not 16 <= d <= 256 or S.dtype != torch.float32 or \
            len({q_BQd.dtype, k_BHd.dtype, v_BHd.dtype}) != 1 or \
            q_BQd.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise NotImplementedError(f"head dim {d}, dtypes {q_BQd.dtype}/{S.dtype}")
    import triton
    from retention.kernels.triton import decode
    ii, jj, wt = _decode_tables(d, q_BQd.device)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    log_g = (torch.zeros(B, H, dtype=torch.float32, device=q_BQd.device) if log_g_BH is None
             else log_g_BH.float().contiguous())
    z_old = z.clone()
    y = torch.empty(B, Hq, d, dtype=q_BQd.dtype, device=q_BQd.device)
    bv = min(d, 32)
    decode._step[(B * H, d // bv)](
        q_BQd.contiguous(), k_BHd.contiguous(), v_BHd.contiguous(), log_g, S, z_old, S, z, y,
        ii, jj, wt, scale, H, Hq, D, D_HEAD=d, RGP=triton.next_power_of_2(Hq // H), BF=64,
        BV=bv, num_warps=4)
    return y


def power_retention_step_(q_BQd, k_BHd, v_BHd, log_g_BH, state, *, degree: int = 2,
                          scale: float | None = None, impl: str = "auto"):
    """One recurrent token written into `state` = (S [B,H,D,d], z [B,H,D]) in place (both
    contiguous, float32, or float64 for float64 inputs); returns y [B,Hq,d]. Nothing of the
    state's size is allocated, so a decode loop (or a captured CUDA graph) reuses the same
    buffers every token. No autograd: call it under torch.no_grad / inference_mode."""
    B, Hq, H, d = _check_step_inputs(q_BQd, k_BHd, v_BHd, log_g_BH, degree)
    S, z = state
    check_state_shapes(S.shape, z.shape, B, H, feature_dim(d, degree), d)
    cdt = _compute_dtype(q_BQd)
    if S.dtype != cdt or z.dtype != cdt or not (S.is_contiguous() and z.is_contiguous()):
        raise ValueError(f"an in-place state must be contiguous {cdt} tensors, got S {S.dtype} "
                         f"and z {z.dtype}; copy it once with .to({cdt}).contiguous()")
    if resolve_impl(impl, q_BQd) == "kernel":
        try:
            return _step_kernel_(q_BQd, k_BHd, v_BHd, log_g_BH, S, z, degree, scale)
        except NotImplementedError as e:
            _warn_once(("fallback-step_", impl, degree),
                       f"power_retention_step_: the Triton kernel does not cover these inputs "
                       f"({e}); using the ops path")
    return _step_ops_(q_BQd, k_BHd, v_BHd, log_g_BH, S, z, degree, scale)


# --- dispatcher -------------------------------------------------------------------------

_resolved: dict[tuple, str] = {}
_warned: set = set()
_kernels: list = []   # retention.kernels.triton once _resolve has vetted it (a global read
                      # traces; an import inside torch.compile's traced region does not)


def _kernel_module():
    """(retention.kernels.triton, why) if it imports and says it can run here, else (None, why)."""
    try:
        kernel = importlib.import_module("retention.kernels.triton")
    except Exception as e:  # the kernel package may be absent or fail to import triton
        return None, f"the Triton kernels could not be imported ({type(e).__name__}: {e})"
    try:
        answer = kernel.available()    # (ok, reason) or a bare bool
    except Exception as e:
        return None, f"the Triton kernels report an error ({type(e).__name__}: {e})"
    ok, why = answer if isinstance(answer, tuple) else (answer, "")
    return (kernel if ok else None), (why or ("available" if ok else "not available here"))


def _interpreting() -> bool:
    # TRITON_INTERPRET=1 runs the kernels on CPU tensors (slow): only when asked for by name.
    return os.environ.get("TRITON_INTERPRET") == "1"


def _warn_once(key, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def resolve_impl(impl: str, device_or_tensor) -> str:
    """Which path runs ("kernel" or "ops") for `impl` on this device; decided once per
    (impl, device type), logged once, with a warning when "kernel" must fall back."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    device = (device_or_tensor.device if isinstance(device_or_tensor, torch.Tensor)
              else torch.device(device_or_tensor))
    return _resolve(impl, device.type)


# Run eagerly when torch.compile traces a caller, its answer a constant: the first call may
# fill the cache, a side effect that activation checkpointing's traced region refuses.
@torch.compiler.assume_constant_result
def _resolve(impl: str, device_type: str) -> str:
    key = (impl, device_type)
    if key in _resolved:
        return _resolved[key]
    choice, why = "ops", "asked for"
    if impl != "ops":
        if device_type != "cuda" and not (impl == "kernel" and _interpreting()):
            why = f"the Triton kernels need CUDA tensors, got {device_type}"
        else:
            kernel, why = _kernel_module()
            if kernel is not None:
                choice = "kernel"
                _kernels[:] = [kernel]
        if impl == "kernel" and choice == "ops":
            _warn_once(key, f"power_retention(impl='kernel'): {why}; falling back to the ops path")
    _resolved[key] = choice
    logger.info("power retention on %s: %s path (impl=%r: %s)", device_type, choice, impl, why)
    return choice


def _run_kernel(name: str, key: tuple, ops_fn, *args, kernel_kwargs=None, **kwargs):
    """Call the kernel (kernel_kwargs override kwargs for it alone); one that raises
    NotImplementedError for these inputs falls back to ops_fn(*args, **kwargs)."""
    # resolve_impl vetted and kept it (the import is for callers that bypass it: tests)
    kernel = _kernels[0] if _kernels else importlib.import_module("retention.kernels.triton")
    try:
        return getattr(kernel, name)(*args, **{**kwargs, **(kernel_kwargs or {})})
    except NotImplementedError as e:
        _warn_once(key, f"{name}: the Triton kernel does not cover these inputs ({e}); "
                        "using the ops path")
        return ops_fn(*args, **kwargs)


def power_retention(q, k, v, log_g=None, *, degree: int = 2, scale: float | None = None,
                    chunk_size: int | None = None, initial_state=None, return_state: bool = False,
                    impl: str = "auto"):
    """y [B,T,Hq,d] (and the final state if return_state): the kernel on CUDA when available
    (impl="auto"), the ops path otherwise; impl="kernel" on CPU warns and uses the ops path.
    chunk_size is the ops path's chunk (the model config's, sized for CPU and MLX memory);
    the kernels choose their own (256 from T=256: 7% faster than 128 on an H200), which
    RETENTION_TRITON_CHUNK overrides."""
    kwargs = dict(degree=degree, scale=scale, chunk_size=chunk_size,
                  initial_state=initial_state, return_state=return_state)
    if resolve_impl(impl, q) == "kernel":
        return _run_kernel("power_retention", ("fallback", impl, degree, q.shape[-1]),
                           power_retention_ops, q, k, v, log_g,
                           kernel_kwargs=dict(chunk_size=None), **kwargs)
    return power_retention_ops(q, k, v, log_g, **kwargs)


def power_retention_step(q_BQd, k_BHd, v_BHd, log_g_BH=None, state=None, *, degree: int = 2,
                         scale: float | None = None, impl: str = "auto"):
    """One recurrent token -> (y [B,Hq,d], (S, z)); state None means zeros."""
    if resolve_impl(impl, q_BQd) == "kernel":
        return _run_kernel("power_retention_step", ("fallback-step", impl, degree),
                           power_retention_step_ops, q_BQd, k_BHd, v_BHd, log_g_BH, state,
                           degree=degree, scale=scale)
    return power_retention_step_ops(q_BQd, k_BHd, v_BHd, log_g_BH, state, degree=degree,
                                    scale=scale)
