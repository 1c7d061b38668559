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


def _start_ranks(cmd, rendezvous, world=2):
    """Start `cmd` on `world` ranks the way torchrun would (RANK, WORLD_SIZE, LOCAL_RANK), meeting
    through a rendezvous file and gloo on the loopback; the processes, running."""
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
    return procs


def _run_ranks(cmd, rendezvous, world=2):
    """_start_ranks, then (stdout, stderr) of each rank; every rank must exit 0."""
    import subprocess

    procs = _start_ranks(cmd, rendezvous, world)
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
def start_ranks():
    """The multi-rank launchers above, for tests in any folder (fixtures: a test module
    cannot import from a conftest reliably when another folder has one too)."""
    return _start_ranks


@pytest.fixture
def run_ranks():
    return _run_ranks


_CLI_FIELDS = ("data", "seq_len", "batch_size", "grad_accum", "steps", "lr", "min_lr",
               "warmup_steps", "weight_decay", "clip_norm", "eval_every", "eval_batches",
               "save_every", "keep_last", "log_interval")


def _train_cli_flags(config, model_json):
    """`retention train` flags for the run that TrainConfig `config` describes, so a multi-process
    run and its one-process twin cannot drift apart."""
    flags = ["--model", str(model_json)]
    for name in _CLI_FIELDS:
        flags += ["--" + name.replace("_", "-"), str(getattr(config, name))]
    flags += ["--out", str(config.out_dir)]
    flags += [] if config.progress else ["--no-progress"]
    flags += [] if config.tensorboard else ["--no-tensorboard"]
    return flags


@pytest.fixture
def train_cli_flags():
    return _train_cli_flags
