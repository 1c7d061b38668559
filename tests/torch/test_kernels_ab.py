"""benchmarks/kernels_ab.py: settings parsed, each run in turn with its environment, the table;
a child that cannot run (no GPU here) is an error that carries its stderr."""
import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("torch")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels_ab.py"


def load_script():
    spec = importlib.util.spec_from_file_location("kernels_ab", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_settings_parse():
    m = load_script()
    assert m.parse_setting("base") == {}
    assert m.parse_setting("A=1, B=x") == {"A": "1", "B": "x"}
    assert m.parse_setting("A=") == {"A": ""}
    for bad in ("A", "=1", "A=1,B"):
        with pytest.raises(ValueError, match="NAME=VALUE"):
            m.parse_setting(bad)


def test_settings_alternate_and_the_table_lists_every_run(capsys):
    m = load_script()
    calls = []

    def runner(env, Ts, timeout, d):
        assert d == 128
        calls.append(dict(env))
        k = len(calls)
        return {T: [k + T / 1000, 10 * k + T / 1000] for T in Ts}

    runs = m.ab(["base", "X=0,Y=2"], [1024, 4096], repeats=2, runner=runner, d=128)
    assert calls == [{}, {"X": "0", "Y": "2"}, {}, {"X": "0", "Y": "2"}]
    assert [r[4096] for r in runs["X=0,Y=2"]] == [pytest.approx([6.096, 24.096]),
                                                  pytest.approx([8.096, 44.096])]
    out = capsys.readouterr().out
    assert "run 2 X=0,Y=2: T=1024 5.024 / 41.024 ms" in out
    assert "| base | 1024 | 2.024 / 4.024 | 11.024 / 31.024 |" in out
    assert "| X=0,Y=2 | 4096 | 6.096 / 8.096 | 24.096 / 44.096 |" in out


def test_a_child_that_fails_raises_with_its_stderr():
    m = load_script()
    with pytest.raises(RuntimeError, match="failed") as e:
        m.run_child({"CUDA_VISIBLE_DEVICES": ""}, [64], timeout=300)
    assert "Error" in str(e.value)   # the child's traceback, not a bare exit code


def test_one_setting_is_refused():
    m = load_script()
    with pytest.raises(SystemExit):
        m.main(["base"])
