"""`retention plot RUN_DIR`: a PNG of training loss, validation loss, learning rate and
throughput from `<RUN_DIR>/metrics.jsonl` (matplotlib, the optional `plot` extra)."""
from __future__ import annotations

import json
from pathlib import Path

from retention.metrics import METRICS_FILE


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir)
    path = path if path.is_file() else path / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {METRICS_FILE} at {path}; pass the run's --out directory")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
    if not records:
        raise ValueError(f"{path} holds no metrics yet; train for a few steps first")
    return records


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in records
             if isinstance(r.get(key), (int, float)) and r[key] == r[key]]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the four-panel PNG (default `<run_dir>/training.png`) and return its path."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'retention-llm[plot]'") from None
    records = read_metrics(run_dir)
    out = Path(out) if out is not None else Path(run_dir) / "training.png"
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    ax = axes[0][0]
    ax.plot(*_series(records, "loss"), label="train", lw=1)
    vs, vl = _series(records, "val_loss")
    if vs:
        ax.plot(vs, vl, "o-", label="validation", ms=3)
    ax.set_title("loss")
    ax.legend()
    ax = axes[0][1]
    if vs:
        ax.plot(vs, vl, "o-", color="C1", ms=3)
        ax.set_title("validation loss")
    else:
        ax.plot(*_series(records, "perplexity"))
        ax.set_title("perplexity (no validation yet)")
        ax.set_yscale("log")
    ax = axes[1][0]
    ax.plot(*_series(records, "lr"))
    ax.set_title("learning rate")
    ax = axes[1][1]
    ax.plot(*_series(records, "tokens_per_sec"))
    ax.set_title("throughput (tokens/s)")
    for row in axes:
        for a in row:
            a.set_xlabel("step")
            a.grid(alpha=0.3)
    fig.suptitle(str(Path(run_dir).name))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
