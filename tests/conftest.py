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


def _run_ranks(cmd, rendezvous, world=2):
    """Start `cmd` on `world` ranks the way torchrun would (RANK, WORLD_SIZE, LOCAL_RANK), meeting
    through a rendezvous file and gloo on the loopback; (stdout, stderr) of each, all exit 0."""
    import os
    import subprocess

    procs = []
    for rank in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank),
               "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "RETENTION_DIST_INIT": f"file://{rendezvous}", "GLOO_SOCKET_IFNAME": "lo"}
        env.pop("MASTER_ADDR", None)
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=150))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, (_, stderr) in zip(procs, outs):
        assert p.returncode == 0, stderr[-3000:]
    return outs


@pytest.fixture
def run_ranks():
    """The multi-rank launcher above, for tests in any folder."""
    return _run_ranks
