"""kernels/triton/launch.py: a launch the GPU refuses for lack of shared memory is retried with
fewer pipeline stages, and the stages that fit are remembered (checked with a stand-in kernel
that refuses like triton's launcher does; no GPU here)."""
from __future__ import annotations

import types

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")

from triton.runtime.errors import OutOfResources  # noqa: E402


class _Kernel:
    """Refuses launches whose shared memory (40 KB per stage) is over `limit`, as triton's
    CompiledKernel does before running anything."""

    def __init__(self, limit, resource="shared memory"):
        self.fn = types.SimpleNamespace(__name__="_fake")
        self.limit, self.resource, self.tried = limit, resource, []

    def __getitem__(self, grid):
        def run(*args, num_stages, **kwargs):
            self.tried.append(num_stages)
            self.options = kwargs
            if 40_000 * num_stages > self.limit:
                raise OutOfResources(40_000 * num_stages, self.limit, self.resource)
        return run


@pytest.fixture
def launch(monkeypatch):
    from retention.kernels.triton import launch as mod

    monkeypatch.setattr(mod, "_REDUCED", {})
    monkeypatch.setattr(mod, "ENV_REGISTER_CAPS", {})
    return mod


def test_launch_that_fits_runs_once(launch, recwarn):
    k = _Kernel(limit=200_000)
    launch.fitted(k, (4, 2), 1, 2.0, num_stages=3, BM=64)
    assert k.tried == [3] and launch._REDUCED == {} and not recwarn.list


def test_fewer_stages_then_remembered(launch):
    k = _Kernel(limit=90_000)
    with pytest.warns(RuntimeWarning, match="_fake needs more shared memory .* running 2"):
        launch.fitted(k, (4, 2), 1, num_stages=3, BM=64)
    assert k.tried == [3, 2]
    launch.fitted(k, (4, 2), 1, num_stages=3, BM=64)        # straight to what fit
    assert k.tried == [3, 2, 2]
    with pytest.warns(RuntimeWarning):                      # another variant tries 3 first
        launch.fitted(k, (4, 2), 1, num_stages=3, BM=128)
    assert k.tried == [3, 2, 2, 3, 2]


def test_no_stage_count_fits_or_other_resource(launch):
    with pytest.raises(OutOfResources, match="shared memory"):
        launch.fitted(_Kernel(limit=10_000), (1,), num_stages=3)
    k = _Kernel(limit=10_000, resource="threads")
    with pytest.raises(OutOfResources, match="threads"):
        launch.fitted(k, (1,), num_stages=3)
    assert k.tried == [3]    # fewer stages cannot help with threads


def test_register_caps_from_the_environment(launch, monkeypatch):
    """RETENTION_TRITON_MAXNREG replaces the caller's maxnreg per kernel name; 0 removes it."""
    assert launch._register_caps(" _fake=168, _other=0 ,") == {"_fake": 168, "_other": 0}
    with pytest.raises(ValueError, match="kernel=N"):
        launch._register_caps("_fake")
    k = _Kernel(limit=200_000)
    launch.fitted(k, (1,), num_stages=3, BM=64, maxnreg=168)     # the caller's cap as given
    assert k.options == {"BM": 64, "maxnreg": 168}
    monkeypatch.setattr(launch, "ENV_REGISTER_CAPS", {"_fake": 128})
    launch.fitted(k, (1,), num_stages=3, BM=64, maxnreg=168)
    assert k.options == {"BM": 64, "maxnreg": 128}
    monkeypatch.setattr(launch, "ENV_REGISTER_CAPS", {"_fake": 0})
    launch.fitted(k, (1,), num_stages=3, BM=64, maxnreg=168)
    assert k.options == {"BM": 64}
    monkeypatch.setattr(launch, "ENV_REGISTER_CAPS", {"_other": 128})
    launch.fitted(k, (1,), num_stages=3, BM=64)
    assert k.options == {"BM": 64}


def test_timed_register_caps_only_where_timed():
    """ops.REGISTER_CAPS apply to bf16 operands on Hopper at the timed head dims only."""
    import triton.language as tl

    from retention.kernels.triton import attention, chunked, ops

    assert ops._register_cap(attention._attn_dq, 64, tl.bfloat16, 9) == {"maxnreg": 168}
    assert ops._register_cap(attention._attn_dkv, 64, tl.bfloat16, 9) == {"maxnreg": 168}
    assert ops._register_cap(chunked._out_fwd, 64, tl.bfloat16, 9) == {"maxnreg": 168}
    assert ops._register_cap(attention._attn_dq, 128, tl.bfloat16, 9) == {}
    assert ops._register_cap(attention._attn_dq, 64, tl.float32, 9) == {}
    assert ops._register_cap(attention._attn_dq, 64, tl.bfloat16, 8) == {}
    assert ops._register_cap(chunked._dkv_bwd, 64, tl.bfloat16, 9) == {}
