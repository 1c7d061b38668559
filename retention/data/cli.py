"""`retention data list|show|mix|prepare` and `retention tokenizer train`.

The root CLI (retention/cli.py) calls add_data_commands / add_tokenizer_commands with its
subparsers and then `args.func(args)`. Heavy imports happen inside the commands.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from retention.data.catalog import CATEGORIES, get_dataset, list_datasets, mix_reasons


def _print_help(parser):
    def run(args):
        parser.print_help()
        return 0
    return run


def add_data_commands(subparsers) -> None:
    data = subparsers.add_parser("data", help="dataset catalog, mixes and token shards",
                                 description="Dataset catalog, recommended mixes, and "
                                 "preparing token shards for training.")
    data.set_defaults(func=_print_help(data))
    sub = data.add_subparsers(dest="data_command", metavar="ACTION")

    p = sub.add_parser("list", help="list catalog datasets")
    p.add_argument("--category", choices=CATEGORIES, help="only this category")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", help="show one catalog dataset")
    p.add_argument("name", help="catalog name or Hub path")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("mix", help="recommended data mix for a token budget")
    p.add_argument("budget", help="1B, 10B, 100B or 1T")
    p.set_defaults(func=cmd_mix)

    p = sub.add_parser("prepare", help="tokenize sources into memory-mapped token shards",
                       description="Stream sources, filter, tokenize (with a progress bar) "
                       "and write token shards + index.json + the tokenizer into --out.")
    p.add_argument("--source", action="append", default=[], metavar="NAME_OR_PATH",
                   help="catalog name, Hub id, file/glob/folder or 'builtin'; repeat to mix")
    p.add_argument("--weights", help="comma-separated mix weights, one per --source")
    p.add_argument("--mix", metavar="BUDGET", help="use the recommended mix (1B, 10B, ...)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tokenizer", default="default",
                   help="folder/tokenizer.json, 'gpt2', Hub id, or 'default' (built-in BPE)")
    p.add_argument("--filters", default="auto",
                   help="'auto' (default: all rules and dedup, except for the curated "
                        "built-in corpus), 'default', 'none' or comma-separated names: "
                        "gopher_quality, gopher_repetition, c4, fineweb, exact_dedup, "
                        "near_dedup")
    p.add_argument("--no-filter", action="store_true", help="same as --filters none")
    p.add_argument("--max-docs", type=int, help="read at most this many records")
    p.add_argument("--max-tokens", type=int, help="write at most about this many train tokens")
    p.add_argument("--val-fraction", type=float,
                   help="share of documents held out for validation (default 0.005; the "
                        "built-in corpus uses its own split)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard")
    p.add_argument("--format", dest="chat_format",
                   help="records are conversations: alpaca, dolly, messages, sharegpt, auto")
    p.add_argument("--seed", type=int, default=0, help="mixing seed")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)


def add_tokenizer_commands(subparsers) -> None:
    tok = subparsers.add_parser("tokenizer", help="train tokenizers",
                                description="Train a byte-level BPE tokenizer.")
    tok.set_defaults(func=_print_help(tok))
    sub = tok.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    p = sub.add_parser("train", help="train a byte-level BPE on any source",
                       description="Train a byte-level BPE (HF tokenizers) and save "
                       "tokenizer.json + tokenizer_config.json (EOS/BOS/PAD = <|endoftext|>, "
                       "ChatML chat template) into --out.")
    p.add_argument("--source", action="append", default=[], metavar="NAME_OR_PATH",
                   help="catalog name, Hub id, file/glob/folder or 'builtin'; repeat to mix")
    p.add_argument("--weights", help="comma-separated mix weights, one per --source")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--max-docs", type=int, help="train on at most this many records")
    p.add_argument("--max-chars", type=int, default=500_000_000,
                   help="train on at most this many characters (default 500M)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tokenizer_train)


# ---------------------------------------------------------------------------------------------


def cmd_list(args) -> int:
    entries = list_datasets(args.category)
    if args.json:
        print(json.dumps({n: e.to_dict() for n, e in entries.items()}, indent=2))
        return 0
    print(f"{'name':<24} {'category':<10} {'size':<28} {'license':<40} hf_path")
    for name, e in entries.items():
        gated = " (gated)" if e.gated else ""
        license_ = e.license if len(e.license) <= 40 else e.license[:37] + "..."
        print(f"{name:<24} {e.category:<10} {e.size_tokens:<28} {license_:<40} "
              f"{e.hf_path}{gated}")
    return 0


def cmd_show(args) -> int:
    e = get_dataset(args.name)
    rows = [("name", e.name), ("hf_path", e.hf_path), ("config", e.config),
            ("split", e.split), ("validation_split", e.validation_split),
            ("category", e.category), ("format", e.format),
            ("text_fields", ", ".join(e.text_fields) or "-"), ("size", e.size_tokens),
            ("license", e.license), ("gated", "yes" if e.gated else "no"),
            ("description", e.description), ("notes", e.notes)]
    for key, value in rows:
        if value not in (None, ""):
            print(f"{key:<17} {value}")
    return 0


def cmd_mix(args) -> int:
    for name, proportion, reason in mix_reasons(args.budget):
        print(f"{name:<16} {proportion * 100:5.1f}%  {reason}")
    return 0


def _sources(args) -> tuple[list[str], list[float] | None]:
    specs = list(args.source)
    weights = None
    if getattr(args, "mix", None):
        if specs or args.weights:
            raise ValueError("give --source (with --weights) or --mix, not both: a mix "
                             "brings its own weights")
        from retention.data.catalog import get_recommended_mix
        pairs = get_recommended_mix(args.mix)
        return [n for n, _ in pairs], [w for _, w in pairs]
    if not specs:
        raise ValueError("give at least one --source (a catalog name, a path or 'builtin')")
    if args.weights:
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError:
            raise ValueError(f"--weights must be numbers separated by commas, got "
                             f"{args.weights!r}") from None
        if len(weights) != len(specs):
            raise ValueError(f"{len(specs)} --source but {len(weights)} --weights")
    return specs, weights


def cmd_prepare(args) -> int:
    from retention.data.filters import FilterReport
    from retention.data.prepare import prepare_shards
    specs, weights = _sources(args)
    index = prepare_shards(
        specs, args.out, weights=weights, tokenizer=args.tokenizer,
        filters=None if args.no_filter or args.filters == "none" else args.filters,
        max_docs=args.max_docs, max_tokens=args.max_tokens, val_fraction=args.val_fraction,
        shard_tokens=args.shard_tokens, seed=args.seed, chat_format=args.chat_format,
        overwrite=args.overwrite, progress=not args.quiet)
    if index["filters"]:
        print(FilterReport.from_dict(index["filters"]["report"]).format())
    for name, split in index["splits"].items():
        print(f"{name:<10} {split['num_docs']:>9} docs {split['num_tokens']:>12} tokens "
              f"in {len(split['shards'])} shard(s)")
    print(f"read {index['records_read']} records in {index['seconds']:.1f} s "
          f"({index['tokens_per_second']} tokens/s); dtype {index['dtype']}, "
          f"vocab {index['vocab_size']}; wrote {args.out}")
    return 0


def training_texts(source, max_docs=None, max_chars=None):
    """Texts of a source for tokenizer training; conversations become their contents."""
    from itertools import islice

    from retention.data.chat import MalformedRecord, to_messages
    chars = 0
    for record in islice(source, max_docs):
        text = record.get("text")
        if not isinstance(text, str):
            try:
                text = "\n\n".join(m["content"] for m in to_messages(record))
            except MalformedRecord:
                continue
        yield text
        chars += len(text)
        if max_chars is not None and chars >= max_chars:
            return


def cmd_tokenizer_train(args) -> int:
    from retention.data.sources import open_mix
    from retention.data.tokenizer import train_bpe
    specs, weights = _sources(args)
    source = open_mix(specs, weights, seed=args.seed, split="train")
    start = time.perf_counter()
    tok = train_bpe(training_texts(source, args.max_docs, args.max_chars), args.vocab_size,
                    min_frequency=args.min_frequency, name=str(args.out))
    out = tok.save(args.out)
    short = f" (asked for {args.vocab_size}: the text has no more merges)" \
        if tok.vocab_size < args.vocab_size else ""
    print(f"trained a byte-level BPE of {tok.vocab_size} tokens{short} on "
          f"{source.stats.records} records in {time.perf_counter() - start:.1f} s; "
          f"wrote {out}/tokenizer.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """A parser with only the data and tokenizer commands (tests, `python -m
    retention.data.cli`)."""
    parser = argparse.ArgumentParser(prog="retention")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_data_commands(sub)
    add_tokenizer_commands(sub)
    return parser


if __name__ == "__main__":
    parsed = build_parser().parse_args()
    sys.exit(parsed.func(parsed) if hasattr(parsed, "func") else 0)
