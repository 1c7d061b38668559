"""benchmarks/train_scale.py runs end to end on the CPU (tiny preset, 2 steps): the table row,
the JSON fields and the --profile summary; an out-of-memory error is reported with exit status 2 and a JSON record."""
import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "train_scale.py"
ARGS = ["--model", "tiny", "--vocab-size", "256", "--n-layers", "2", "--seq-len", "64",
        "--batch-size", "2", "--warmup", "1", "--steps", "1", "--device", "cpu"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_one_process_prints_the_row_and_writes_the_json(tmp_path):
    out = tmp_path / "row.json"
    run = subprocess.run([sys.executable, str(SCRIPT), *ARGS, "--activation-checkpointing",
                          "--fused-adamw", "--json", str(out), "--profile"], capture_output=True,
                         text=True, timeout=120, env=ENV)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "step 1/2 (warmup)" in run.stdout and "step 2/2 (timed)" in run.stdout
    # --profile: one more step, its operators by family (model_throughput's classification)
    assert "-- profiled step:" in run.stdout and "matmul" in run.stdout
    rows = [line for line in run.stdout.splitlines() if line.startswith("| tiny |")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[1] == "1" and cells[3] == "64" and cells[4] == "2 x 1"
    assert cells[5] == "AC, fused AdamW" and cells[8].endswith("%")
    r = json.loads(out.read_text())
    assert r["status"] == "ok" and r["gpus"] == 1 and r["fused_adamw"] is True
    assert r["activation_checkpointing"] is True and len(r["step_times_s"]) == 1
    assert len(r["losses"]) == 2 and all(l > 0 for l in r["losses"])
    assert r["tokens_per_step_per_gpu"] == 2 * 64
    assert r["tokens_per_sec_per_gpu"] == 128 / r["step_time_s"]
    assert 0 < r["mfu"] < 1 and r["peak_rss_gib"] > 0 and r["peak_allocated_gib"] is None
    assert r["flops_per_token"] > 0 and r["peak_flops"] > 0


def test_out_of_memory_is_reported_with_exit_status_2(tmp_path):
    """A train step that raises torch.OutOfMemoryError (patched in: the CPU does not run out)."""
    out = tmp_path / "oom.json"
    code = ("import sys, runpy, torch\n"
            "from retention.backends.torch.trainer import Trainer\n"
            "def boom(self, *a, **k):\n"
            "    raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 9 GiB')\n"
            "Trainer.train_step = boom\n"
            f"sys.argv = [{str(SCRIPT)!r}] + sys.argv[1:]\n"
            f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n")
    run = subprocess.run([sys.executable, "-c", code, *ARGS, "--json", str(out)],
                         capture_output=True, text=True, timeout=120, env=ENV)
    assert run.returncode == 2, run.stderr[-3000:]
    assert "OUT OF MEMORY on rank 0 (cpu) during step 1 (warmup)" in run.stdout
    assert "Tried to allocate 9 GiB" in run.stderr
    r = json.loads(out.read_text())
    assert r["status"] == "oom" and r["oom_phase"] == "step 1 (warmup)"
    assert r["memory"]["peak_rss_gib"] > 0
