"""CLI subcommands, one module each; each exposes add_commands(subparsers)."""
