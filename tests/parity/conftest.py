"""Fixtures of the cross-backend parity tests."""
import pytest


@pytest.fixture(scope="module")
def highest_float32_matmul():
    """Exact float32 matmuls in torch for the module, as MLX's CPU path computes them."""
    import torch

    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)
