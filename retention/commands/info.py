"""`retention info`: version, installed backends and devices; `retention convert`: checkpoint
dtype conversion (loads on one backend, writes the canonical directory)."""
from __future__ import annotations

import importlib.util


def add_commands(sub) -> None:
    p = sub.add_parser("info", help="show the version, installed backends and devices")
    p.set_defaults(func=run_info)
    p = sub.add_parser("convert", help="re-save a checkpoint (e.g. to bfloat16)")
    p.add_argument("src", help="checkpoint directory to read")
    p.add_argument("dst", help="checkpoint directory to write")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--backend", choices=["torch", "mlx"], default=None)
    p.set_defaults(func=run_convert)


def run_info(args) -> int:
    from retention import __version__
    from retention.backends import default_backend
    print(f"retention {__version__}; default backend: {default_backend()}")
    for name in ("torch", "mlx", "triton"):
        found = importlib.util.find_spec(name) is not None
        print(f"  {name:7s} {'installed' if found else 'not installed'}")
    return 0


# Files a checkpoint carries beside its weights that generation needs (the tokenizer).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def run_convert(args) -> int:
    import shutil

    from retention.backends import get_backend
    from retention.checkpoint import read_checkpoint
    backend = get_backend(args.backend)
    src = read_checkpoint(args.src).path
    model = backend.load_model(src)

    def copy_tokenizer(tmp):
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
    path = backend.save_model(model, args.dst, dtype=args.dtype, extra=copy_tokenizer)
    print(f"wrote {path}")
    return 0
