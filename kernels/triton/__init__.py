"""Triton kernels of power retention for the torch backend (CUDA, or CPU under
TRITON_INTERPRET=1). Importing this package needs neither torch nor triton; the kernels and
their torch.library ops load on first use.

    available() -> (ok, reason)
    power_retention(q, k, v, log_g=None, *, degree=2, scale=None, chunk_size=None,
                    initial_state=None, return_state=False)
    power_retention_step(q_BQd, k_BHd, v_BHd, log_g_BH, state) -> (y_BQd, (S, z))
    cross_entropy(logits_NV, targets_N, ignore_index=-100) -> mean loss (fused, one op)
"""
from __future__ import annotations

import os


def available() -> tuple[bool, str]:
    """Whether the kernels can run here, and why (not)."""
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    try:
        import triton
    except ImportError:
        return False, "triton is not installed (pip install triton; Linux x86-64 with CUDA)"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1, CPU tensors)"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU visible to torch"
    major, _ = torch.cuda.get_device_capability()
    if major < 8:
        return False, "the kernels need a CUDA GPU of compute capability 8.0 or newer (bf16)"
    return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"


def power_retention(*args, **kwargs):
    from .ops import power_retention as impl

    return impl(*args, **kwargs)


def power_retention_step(*args, **kwargs):
    from .ops import power_retention_step as impl

    return impl(*args, **kwargs)


def cross_entropy(*args, **kwargs):
    from .loss import cross_entropy as impl

    return impl(*args, **kwargs)
