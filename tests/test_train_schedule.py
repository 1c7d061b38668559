"""Learning-rate schedule: linear warmup, then cosine to min_lr."""
import math

import pytest

from retention.schedule import learning_rate


def lr_at(step, **kw):
    args = dict(lr=1e-3, min_lr=1e-4, warmup_steps=10, total_steps=110, schedule="cosine")
    args.update(kw)
    return learning_rate(step, **args)


def test_warmup_is_linear_and_reaches_peak():
    assert lr_at(0) == pytest.approx(1e-4)
    assert lr_at(4) == pytest.approx(5e-4)
    assert lr_at(9) == pytest.approx(1e-3)
    assert lr_at(10) == pytest.approx(1e-3)   # cosine starts at the peak


def test_cosine_is_monotone_and_ends_at_min_lr():
    values = [lr_at(s) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert values[-1] == pytest.approx(1e-4)
    mid = 10 + (110 - 10 - 1) / 2
    assert lr_at(int(mid)) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(
        math.pi * (int(mid) - 10) / 99)))
    assert lr_at(500) == pytest.approx(1e-4)  # past the end stays at min_lr


def test_constant_and_no_warmup():
    assert lr_at(0, warmup_steps=0) == pytest.approx(1e-3)
    assert lr_at(50, schedule="constant") == pytest.approx(1e-3)
    assert lr_at(3, schedule="constant") == pytest.approx(4e-4)
