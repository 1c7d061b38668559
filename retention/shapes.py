"""Argument checks shared by every power retention implementation (reference, ops, kernels),
so each raises the same clear ValueError for the same mistake."""
from __future__ import annotations


def check_retention_inputs(q_shape, k_shape, v_shape, log_g_shape=None, degree: int = 2,
                           chunk_size: int | None = None) -> tuple[int, int, int, int, int]:
    """Validate q [B,T,Hq,d], k and v [B,T,H,d], log_g [B,T,H]; return (B, T, Hq, H, d)."""
    q_shape, k_shape, v_shape = tuple(q_shape), tuple(k_shape), tuple(v_shape)
    if not isinstance(degree, int) or degree < 2 or degree % 2:
        raise ValueError(f"degree must be an even integer >= 2, got {degree!r}")
    if (len(q_shape) != 4 or len(k_shape) != 4 or k_shape != v_shape
            or q_shape[:2] != k_shape[:2] or q_shape[3] != k_shape[3]):
        raise ValueError(f"expected q [B,T,Hq,d], k and v [B,T,H,d]; got {q_shape}, {k_shape}, "
                         f"{v_shape}")
    B, T, Hq, d = q_shape
    H = k_shape[2]
    if Hq % H:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({H})")
    if log_g_shape is not None and tuple(log_g_shape) != (B, T, H):
        raise ValueError(f"log_g must have shape [B,T,H] = {(B, T, H)}, got {tuple(log_g_shape)}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    return B, T, Hq, H, d


def check_state_shapes(S_shape, z_shape, B: int, H: int, D: int, d: int) -> None:
    """A state is (S [B,H,D,d], z [B,H,D]) in the canonical feature layout."""
    if tuple(S_shape) != (B, H, D, d) or tuple(z_shape) != (B, H, D):
        raise ValueError(f"state must be (S [B,H,D,d], z [B,H,D]) = ({(B, H, D, d)}, "
                         f"{(B, H, D)}), got ({tuple(S_shape)}, {tuple(z_shape)})")
