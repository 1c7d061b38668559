"""benchmarks/diagonal_layouts.py: its layouts hold every canonical feature once, and its
read kernels agree with the canonical read under the Triton interpreter."""
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "..", "..", "benchmarks", "diagonal_layouts.py")
sys.path.insert(0, os.path.dirname(SCRIPT))

import diagonal_layouts as dl  # noqa: E402


@pytest.mark.parametrize("features", [dl.pair_features, dl.cyclic_features])
def test_layouts_cover_the_canonical_features_once(features):
    import numpy as np

    from retention.reference import feature_index

    d = 64
    feats = features(d)
    assert len(feats) == 2112 and sum(f is None for f in feats) == 32
    pairs = sorted((min(a, b), max(a, b)) for a, b, _ in filter(None, feats))
    tuples, _ = feature_index(d, 2)
    assert pairs == sorted(map(tuple, np.asarray(tuples).tolist()))
    # phi(q).phi(k) = (q.k)^2 with the layout's weights
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=d), rng.normal(size=d)
    dot = sum(w * w * q[a] * q[b] * k[a] * k[b] for a, b, w in filter(None, feats))
    assert math.isclose(dot, float(q @ k) ** 2, rel_tol=1e-10)


def test_reads_agree_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, SCRIPT, "--check"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("check ") == 4 and "FAIL" not in proc.stdout
