"""Fixtures shared across test folders."""
import pytest


@pytest.fixture
def torch_one_thread():
    """Tiny shapes: one intra-op thread is faster, and immune to a busy machine's contention."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
