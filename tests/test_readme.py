"""The README's Python example runs as written (torch builds and saves, MLX loads, logits agree)."""
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no Python example"
    out = subprocess.run([sys.executable, "-c", blocks[0]], cwd=tmp_path, check=True,
                         capture_output=True, text=True)
    assert float(out.stdout.split()[-1]) < 1e-4
    assert (tmp_path / "ckpt" / "model.safetensors").exists()
