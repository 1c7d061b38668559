"""`retention <command>`: parses arguments first and imports a backend only when a command
needs one, so `retention --help` and the data commands start fast on any machine."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# (module, function) pairs that add subcommands to the parser. A module that does not exist
# is skipped, so the CLI works while a feature is not written yet.
COMMAND_MODULES = (
    ("retention.commands.info", "add_commands"),
    ("retention.data.cli", "add_data_commands"),
    ("retention.data.cli", "add_tokenizer_commands"),
    ("retention.commands.train", "add_commands"),
    ("retention.commands.generate", "add_commands"),
)


def build_parser() -> argparse.ArgumentParser:
    from retention import __version__
    parser = argparse.ArgumentParser(
        prog="retention", description="Train and run power-retention language models on "
        "MLX (Apple Silicon) or PyTorch (CUDA/CPU) from one spec.")
    parser.add_argument("--version", action="version", version=f"retention {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, function in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):
                continue
            raise
        getattr(module, function)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"retention {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
