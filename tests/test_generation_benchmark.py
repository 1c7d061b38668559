"""benchmarks/generate.py still runs end to end (tiny preset, short contexts, both fills)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "generate.py"


@pytest.mark.parametrize("fill", ["random", "prefill"])
def test_benchmark_runs_and_reports_every_row(tmp_path, fill):
    out = tmp_path / "rows.json"
    cmd = [sys.executable, str(SCRIPT), "--preset", "tiny", "--vocab-size", "512",
           "--contexts", "64", "160", "--decode-tokens", "2", "--warmup", "1", "--repeats", "1",
           "--prefill-chunk", "96", "--fill", fill, "--threads", "1", "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    got = {(r["framework"], r["model"], r["context"]) for r in rows}
    mlx_models = ("retention", "mlx-lm llama") if importlib.util.find_spec("mlx_lm") \
        else ("retention",)                                 # the script says mlx-lm is missing
    want = {(fw, m, n) for fw, models in (("torch", ("retention", "llama-kv")),
                                          ("mlx", mlx_models))
            for m in models for n in (64, 160)}
    assert want <= got
    state = {r["state_mib"] for r in rows if r["model"] == "retention"}
    assert len(state) == 1                                  # one size whatever the context
    kv = {r["context"]: r["state_mib"] for r in rows if r["model"] == "llama-kv"}
    assert kv[160] == pytest.approx(kv[64] * 160 / 64, rel=0.05)   # the KV cache grows
