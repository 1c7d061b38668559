"""Backend registry: `get_backend("mlx" | "torch")` imports the framework only when asked."""
from __future__ import annotations

import importlib
import platform
import sys
from pathlib import Path

BACKENDS = {"torch": ("torch", "retention-llm[torch]"), "mlx": ("mlx", "retention-llm[mlx]")}


def default_backend() -> str:
    """mlx on Apple Silicon, torch elsewhere."""
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return "mlx"
    return "torch"


def get_backend(name: str | None = None):
    """The backend module for `name`: build_model, save_model, load_model, from_numpy,
    to_numpy, power_retention, power_retention_step."""
    name = default_backend() if name is None else str(name).lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {sorted(BACKENDS)}")
    framework, extra = BACKENDS[name]
    try:
        importlib.import_module(framework)
    except ImportError as e:
        raise ImportError(f"the {name} backend needs {framework}, which is not installed "
                          f"({e}); install it with: pip install '{extra}'") from None
    return importlib.import_module(f"retention.backends.{name}")


def backend_of(model) -> str:
    """Which backend a model object belongs to, from the module that defined its class."""
    module = type(model).__module__
    for name in BACKENDS:
        if module.startswith(f"retention.backends.{name}"):
            return name
    raise ValueError(f"{type(model).__name__} is not a retention model (from {module})")


def load_model(path: str | Path, backend: str | None = None):
    """Load a checkpoint directory written by either backend into `backend`'s model."""
    return get_backend(backend).load_model(path)


def save_model(model, path: str | Path) -> Path:
    """Save any backend's model as a canonical checkpoint directory."""
    return get_backend(backend_of(model)).save_model(model, path)
