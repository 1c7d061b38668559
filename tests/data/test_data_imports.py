import subprocess
import sys


def test_import_is_light():
    # Heavy and framework packages load only inside the functions that need them.
    code = ("import sys, retention.data, retention.data.cli\n"
            "from retention.data import list_datasets, get_dataset, get_recommended_mix, "
            "DataProcessor\n"
            "heavy = ('torch', 'mlx', 'datasets', 'pyarrow', 'zstandard', 'datasketch', "
            "'transformers', 'tokenizers', 'tqdm')\n"
            "print([m for m in heavy if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True)
    assert out.stdout.strip() == "[]"
