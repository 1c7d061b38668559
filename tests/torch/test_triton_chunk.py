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


def test_short_sequences_run_as_one_chunk(monkeypatch):
    """Up to ops.QUADRATIC_MAX[d] the default is one chunk (a multiple of 64): the plain
    attention form, no states; beyond it 256-token chunks."""
    monkeypatch.delenv("RETENTION_TRITON_CHUNK", raising=False)
    monkeypatch.delenv("RETENTION_TRITON_QUADRATIC_MAX", raising=False)
    assert kernel_chunk(1000, None, 64) == 1024
    assert kernel_chunk(6144, None, 64) == 6144
    assert kernel_chunk(6145, None, 64) == 256
    assert kernel_chunk(300, None, 32) == 320
    assert kernel_chunk(8192, None, 32) == 256
    assert kernel_chunk(32768, None, 128) == 32768
    # Prefill or a continued state needs the scan anyway: chunks, as for long sequences.
    assert kernel_chunk(1000, None, 64, stateless=False) == 256
    monkeypatch.setenv("RETENTION_TRITON_QUADRATIC_MAX", "0")   # off: chunks everywhere
    assert kernel_chunk(1000, None, 64) == 256
