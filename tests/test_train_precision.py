"""Precision options: bfloat16 compute keeps float32 master weights, gradients and moments on
both backends, and its loss stays close to the float32 loss."""
import numpy as np
import pytest

from retention.config import ModelConfig, TrainConfig
from retention.train_data import SyntheticBatches

TINY = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16,
                   mlp_hidden=64, chunk_size=8)


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_bfloat16_keeps_float32_master_weights(backend):
    import importlib
    Trainer = importlib.import_module(f"retention.backends.{backend}.trainer").Trainer
    batch = SyntheticBatches(64, 16, 2, seed=0).next_batch()
    losses = {}
    for precision in ("float32", "bfloat16"):
        trainer = Trainer(TINY, TrainConfig(model=TINY, precision=precision, device="cpu"))
        assert trainer.precision == precision
        result = trainer.train_step([batch], lr=1e-3)
        assert not result["skipped"]
        losses[precision] = result["loss"]
        params = trainer.parameters_numpy()
        moments = trainer.optimizer_state_numpy()
        assert all(a.dtype == np.float32 for a in params.values())
        assert all(a.dtype == np.float32 for a in moments.values())
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=2e-2)


def test_auto_precision_is_float32_on_cpu():
    from retention.backends.mlx.trainer import Trainer as MlxTrainer
    from retention.backends.torch.trainer import Trainer as TorchTrainer
    for cls in (TorchTrainer, MlxTrainer):
        assert cls(TINY, TrainConfig(model=TINY, device="cpu")).precision == "float32"


def test_unknown_device_is_a_clear_error():
    from retention.backends.mlx.trainer import Trainer as MlxTrainer
    with pytest.raises(ValueError, match="MLX devices"):
        MlxTrainer(TINY, TrainConfig(model=TINY, device="cuda"))


def test_cuda_without_a_gpu_is_a_clear_error():
    import torch
    from retention.backends.torch.trainer import Trainer as TorchTrainer
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        TorchTrainer(TINY, TrainConfig(model=TINY, device="cuda"))
