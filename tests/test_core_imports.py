"""The backend-neutral core imports neither torch nor mlx (DESIGN section 3)."""
import subprocess
import sys

import pytest

CORE = ["retention", "retention.config", "retention.params", "retention.reference",
        "retention.checkpoint", "retention.backends"]


@pytest.mark.parametrize("module", CORE)
def test_core_module_pulls_in_no_framework(module):
    code = (f"import sys, {module}\n"
            "bad = [m for m in ('torch', 'mlx', 'triton') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_backend_lists_choices():
    import retention
    with pytest.raises(ValueError, match="mlx"):
        retention.get_backend("jax")


def test_missing_framework_names_the_extra():
    # Hide torch from the import system in a child process and ask for the torch backend.
    code = ("import sys; sys.modules['torch'] = None\n"
            "import retention\n"
            "try:\n    retention.get_backend('torch')\nexcept ImportError as e:\n"
            "    assert 'retention-llm[torch]' in str(e), e\n    print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "ok"
