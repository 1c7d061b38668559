"""The PyTorch backend: RetentionLLM, power retention (ops twin + Triton dispatch), checkpoints."""
from retention.backends.torch.power_retention import (power_retention, power_retention_ops,
                                                      power_retention_step, resolve_impl)
from retention.backends.torch.model import ModelState, RetentionLLM, build_model
from retention.backends.torch.checkpoint_io import (from_numpy, load_model,
                                                    load_named_parameters, named_parameters,
                                                    save_model, to_numpy)

name = "torch"

__all__ = ["name", "RetentionLLM", "ModelState", "build_model", "save_model", "load_model",
           "from_numpy", "to_numpy", "power_retention", "power_retention_ops",
           "power_retention_step", "resolve_impl", "named_parameters", "load_named_parameters"]
