"""The MLX backend: RetentionLLM, power retention ops and the Metal kernel slot, checkpoints."""
from retention.backends.mlx.checkpoint_io import (from_numpy, load_model, load_named_parameters,
                                                  named_parameters, save_model, to_numpy)
from retention.backends.mlx.model import ModelState, RetentionLLM, build_model
from retention.backends.mlx.power_retention import (power_retention, power_retention_ops,
                                                    power_retention_step,
                                                    power_retention_step_ops, resolve_impl)

name = "mlx"

__all__ = ["name", "RetentionLLM", "ModelState", "build_model", "save_model", "load_model",
           "from_numpy", "to_numpy", "power_retention", "power_retention_ops",
           "power_retention_step", "power_retention_step_ops", "resolve_impl",
           "named_parameters", "load_named_parameters"]
