"""The one-chunk kernels' gate factors built once per call (ops._key_decay, ops._query_decay):
against the direct formulas, with GQA and zero-padded rows (no kernel launch)."""
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from retention.kernels.triton import ops  # noqa: E402


def _gates(bh, tp, seed=0):
    """Cumulative log-gates b [bh, tp] (non-increasing, as the kernels' bg)."""
    g = torch.Generator().manual_seed(seed)
    return torch.cumsum(-torch.rand(bh, tp, generator=g, dtype=torch.float64), -1)


def test_key_decay_is_the_gate_to_the_blocks_last_position():
    bg = _gates(3, 32)
    out = ops._key_decay(bg, 8)
    for j in range(32):
        last = (j // 8) * 8 + 7
        assert torch.allclose(out[:, j], torch.exp(bg[:, last] - bg[:, j]))
    assert (out <= 1).all()


def test_query_decay_is_the_gate_from_the_blocks_first_row_over_den():
    B, H, group, tp, block = 2, 2, 3, 32, 8          # GQA: 3 query heads per KV head
    bg = _gates(B * H, tp)
    rden = torch.rand(B * H * group, tp, dtype=torch.float64,
                      generator=torch.Generator().manual_seed(1))
    rden[:, -5:] = 0                                  # rows past T: zero 1/den
    out = ops._query_decay(bg, rden, block)
    assert out.shape == rden.shape
    for b in range(B):
        for h in range(H):
            for r in range(group):
                hq = (b * H + h) * group + r          # query heads of a KV head are adjacent
                for i in range(tp):
                    first = (i // block) * block
                    want = torch.exp(bg[b * H + h, i] - bg[b * H + h, first]) * rden[hq, i]
                    assert torch.isclose(out[hq, i], want)
    assert (out[:, -5:] == 0).all() and (out <= rden).all()
