"""retention: power-retention language models on MLX and PyTorch from one spec.

Importing this package pulls in neither torch nor mlx; a backend is imported when asked for.
"""
from retention.config import ModelConfig, TrainConfig, create_model_config
from retention.backends import get_backend, load_model, save_model
from retention.train import train  # rebinds the name from the submodule to the function

__version__ = "0.1.0"

__all__ = ["ModelConfig", "TrainConfig", "create_model_config", "get_backend", "load_model",
           "save_model", "train", "__version__"]
