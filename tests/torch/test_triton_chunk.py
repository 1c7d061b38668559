"""Which chunk the Triton kernels run (no kernel launch)."""
import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")

from retention.kernels.triton.ops import kernel_chunk  # noqa: E402


def test_chunk_size_then_default(monkeypatch):
    monkeypatch.delenv("RETENTION_TRITON_CHUNK", raising=False)
    assert kernel_chunk(65536, 128) == 128          # an explicit chunk is honoured
    assert kernel_chunk(65536, None) == 256
    assert kernel_chunk(50, None) == 64


def test_environment_overrides_chunk_size(monkeypatch):
    monkeypatch.setenv("RETENTION_TRITON_CHUNK", "512")
    assert kernel_chunk(65536, 128) == 512
    assert kernel_chunk(100, None) == 512
