"""Kernel launches that fit the GPU's shared memory.

The launch settings in ops.py were tuned on an H200 (227 KB of shared memory per block). An
A100 has 163 KB, and float32 operands double the tiles: there a kernel compiled for 3 pipeline
stages can need more than the GPU has (benchmarks/sm90_compile.py --arch 80 shows which).
Triton then refuses the launch (OutOfResources) before it runs anything, so `fitted` retries
with one stage fewer, down to 1, and remembers what fit for the next call of that kernel
variant on that device. It also applies RETENTION_TRITON_MAXNREG's register caps, a tuning
knob over the callers' own (ops.REGISTER_CAPS).
"""
from __future__ import annotations

import os
import warnings

from triton.runtime.errors import OutOfResources

_REDUCED: dict = {}   # launch variant -> the fewer stages that fit (only variants that needed it)


def _register_caps(spec: str) -> dict:
    """RETENTION_TRITON_MAXNREG, "kernel=N,kernel=N": ptxas' register cap per kernel name
    (fewer registers, more programs per multiprocessor; 0: no cap), over the caller's
    maxnreg (ops.REGISTER_CAPS): a tuning knob."""
    caps = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, n = item.partition("=")
        if not n.isdigit():
            raise ValueError(f"RETENTION_TRITON_MAXNREG: expected kernel=N items, got {item!r}")
        caps[name.strip()] = int(n)
    return caps


ENV_REGISTER_CAPS = _register_caps(os.environ.get("RETENTION_TRITON_MAXNREG", ""))


def _variant(kernel, args, kwargs, num_stages) -> tuple:
    device = next((a.device for a in args if hasattr(a, "device")), None)
    return (kernel.fn.__name__, device, num_stages,
            tuple(str(getattr(a, "dtype", "")) for a in args),
            tuple(sorted((k, repr(v)) for k, v in kwargs.items())))


def fitted(kernel, grid, *args, num_stages: int, **kwargs) -> None:
    """kernel[grid](*args, num_stages=..., **kwargs), with fewer stages where the GPU's
    shared memory needs it. Launches that fit (all of them on an H100/H200) pay one dict
    lookup at most."""
    cap = ENV_REGISTER_CAPS.get(kernel.fn.__name__)
    if cap is not None:   # the environment's cap replaces the caller's; 0 removes it
        kwargs = {k: v for k, v in kwargs.items() if k != "maxnreg"}
        if cap:
            kwargs["maxnreg"] = cap
    key = _variant(kernel, args, kwargs, num_stages) if _REDUCED else None
    stages = _REDUCED.get(key, num_stages)
    while True:
        try:
            kernel[grid](*args, num_stages=stages, **kwargs)
        except OutOfResources as e:
            if stages <= 1 or "shared memory" not in str(e):
                raise
            stages -= 1
            continue
        if stages != num_stages:
            key = key or _variant(kernel, args, kwargs, num_stages)
            if key not in _REDUCED:
                _REDUCED[key] = stages
                warnings.warn(f"retention: {kernel.fn.__name__} needs more shared memory than "
                              f"this GPU has with {num_stages} pipeline stages; running "
                              f"{stages}", RuntimeWarning, stacklevel=2)
        return
