"""benchmarks/model_throughput.py on the CPU at tiny sizes: both models measured in one process,
the table, the JSON fields and the profile; an out-of-memory row says OOM and the run goes on."""
import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
import torch  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "model_throughput.py"
ARGS = ["--preset", "tiny", "--seqs", "64", "32", "--tokens-per-step", "128", "--steps", "1",
        "--warmup", "1", "--device", "cpu"]


def load_script():
    spec = importlib.util.spec_from_file_location("model_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_rows(text: str, model: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")]
            for line in text.splitlines() if line.startswith(f"| {model} |")]


def test_both_models_rows_json_and_profile(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert load_script().main([*ARGS, "--profile", "--profile-seq", "64",
                               "--json", str(out)]) == 0
    text = capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["device"].startswith("cpu") and r["precision"] == "float32"
    assert r["peak_flops"] > 0 and r["tokens_per_step"] == 128
    # Same size: the two models are within 1% of each other (Llama lacks q/k norms, gates).
    p_ret, p_llama = r["models"]["retention"]["params"], r["models"]["llama"]["params"]
    assert abs(p_ret - p_llama) / p_ret < 0.01
    assert "power retention path: ops" in r["models"]["retention"]["describe"]
    assert "sdpa" in r["models"]["llama"]["describe"]
    # Retention first, then Llama, each at T = 64 then 32; batch = 128 // T.
    assert [(x["model"], x["seq_len"], x["batch"]) for x in r["rows"]] == [
        ("retention", 64, 2), ("retention", 32, 4), ("llama", 64, 2), ("llama", 32, 4)]
    for row in r["rows"]:
        assert row["status"] == "ok" and row["tokens_per_step"] == 128
        assert len(row["step_ms_all"]) == 1 and len(row["losses"]) == 2
        assert all(8 < loss < 13 for loss in row["losses"])  # ~ln(50304) = 10.8 at init
        assert row["tokens_per_sec"] == pytest.approx(128 / (row["step_ms"] / 1e3))
        assert row["flops_per_token"] > 0 and 0 < row["mfu"] < 1
        assert row["mfu"] == pytest.approx(row["tokens_per_sec"] * row["flops_per_token"]
                                           / r["peak_flops"])
        assert row["peak_gib"] > 0 and row["warmup_s"] > 0
    llama = r["rows"][2]
    c = r["model_config"]
    assert llama["flops_per_token"] - llama["flops_per_token_causal"] == \
        6 * c["n_layers"] * c["d_model"] * 64
    # Each row is printed as it is measured and again in the final table.
    ret_rows = table_rows(text, "retention")
    assert len(ret_rows) == 4 and len(table_rows(text, "llama")) == 4
    assert ret_rows[0][:3] == ["retention", "64", "2"] and ret_rows[0][5].endswith("%")
    # The profile: CPU operators by self time, a top list and families.
    prof = r["profile"]
    assert prof["kind"] == "cpu_operators" and prof["seq_len"] == 64 and prof["batch"] == 2
    assert 0 < len(prof["top"]) <= 15 and prof["total_ms"] > 0
    assert prof["top"][0]["total_ms"] >= prof["top"][-1]["total_ms"]
    assert sum(prof["families"].values()) == pytest.approx(prof["total_ms"])
    assert "Profile: retention, T=64" in text


def test_out_of_memory_rows_say_oom_and_the_run_goes_on(tmp_path, capsys, monkeypatch):
    from retention.backends.torch.trainer import Trainer

    def boom(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB")
    monkeypatch.setattr(Trainer, "train_step", boom)
    out = tmp_path / "oom.json"
    assert load_script().main([*ARGS, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    r = json.loads(out.read_text())
    status = {(x["model"], x["seq_len"]): x["status"] for x in r["rows"]}
    assert status == {("retention", 64): "oom", ("retention", 32): "oom",
                      ("llama", 64): "ok", ("llama", 32): "ok"}
    assert "Tried to allocate 9 GiB" in r["rows"][0]["error"]
    assert all(row[3] == "OOM" for row in table_rows(text, "retention"))


def test_llama_flops_formula():
    from retention.config import create_model_config
    module = load_script()
    c = create_model_config("small")
    n = 12 * (4 * 768 * 768 + 3 * 2048 * 768) + 50304 * 768
    assert module.llama_matmul_parameters(c) == n
    assert module.llama_flops_per_token(c, 4096) == 6 * n + 12 * 12 * 768 * 4096
    assert module.kernel_family("_dkv_bwd", module.RETENTION_KERNELS) == \
        "power retention (Triton)"
    assert module.kernel_family("nvjet_tst_128x256_64x4_h_bz_TNT") == "matmul"
    assert module.kernel_family("void pytorch_flash::flash_fwd_kernel<...>") == \
        "attention (flash)"
