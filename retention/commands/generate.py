"""`retention generate`: stream a checkpoint's continuation of a prompt to the terminal, then
report prefill and decode tokens/s and the (context-independent) state memory.

The prompt comes from --prompt, --prompt-file or stdin; the tokenizer is the checkpoint's
tokenizer.json. --save-state writes the state after the prompt (a system prompt prefilled
once); --load-state continues from one, on either backend.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path


def add_commands(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a checkpoint (streams tokens)",
                       description="Stream a checkpoint's continuation of a prompt, then "
                       "report prefill and decode tokens/s and the state memory (fixed, "
                       "whatever the context length).")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (config.json, "
                   "model.safetensors, tokenizer.json)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (default: read --prompt-file or stdin)")
    src.add_argument("--prompt-file", help="read the prompt from this file ('-' = stdin)")
    p.add_argument("--backend", choices=["torch", "mlx"], default=None,
                   help="default: mlx on Apple Silicon, torch elsewhere")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="parameter dtype (default: as stored)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads; on a busy "
                   "machine 1 can decode far faster than the default (no OpenMP spin-waits)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop after this text (repeatable); the tokenizer's EOS also stops")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at EOS")
    p.add_argument("--save-state", metavar="FILE", help="save the state after the prompt "
                   "(safetensors; reuse with --load-state on either backend)")
    p.add_argument("--load-state", metavar="FILE", help="continue from a saved prompt state")
    p.set_defaults(func=run_generate)


def read_prompt(args) -> str:
    """--prompt as given; a file or stdin without the one newline that ends its last line
    (`echo text | retention generate` means "text", not "text\\n")."""
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file not in (None, "-"):
        path = Path(args.prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"no prompt file at {path}")
        return _drop_final_newline(path.read_text())
    if args.prompt_file is None and sys.stdin.isatty():
        raise ValueError("no prompt: pass --prompt TEXT, --prompt-file FILE, or pipe text in")
    return _drop_final_newline(sys.stdin.read())


def _drop_final_newline(text: str) -> str:
    return text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text


def load_checkpoint_tokenizer(checkpoint: Path):
    """The checkpoint's tokenizer: retention.data's wrapper, or plain `tokenizers`."""
    if not (checkpoint / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{checkpoint} has no tokenizer.json; copy the tokenizer the "
                                "model was trained with into the checkpoint directory")
    try:
        from retention.data.tokenizer import load_tokenizer
    except ImportError:
        from tokenizers import Tokenizer
        return Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    return load_tokenizer(checkpoint)


def encode(tokenizer, text: str) -> list[int]:
    """Ids of a prompt or stop text; special tokens written in it (a chat turn's
    <|im_start|>/<|im_end|>) become their ids, as with a Hugging Face tokenizer."""
    try:
        out = tokenizer.encode(text, special=True)
    except TypeError:                    # plain `tokenizers` parses them by default
        out = tokenizer.encode(text, add_special_tokens=False)
    return list(getattr(out, "ids", out))


def eos_id(tokenizer) -> int | None:
    eos = getattr(tokenizer, "eos_id", None)
    return None if eos is None else int(eos)


class TextStreamer:
    """Prints decoded text as tokens arrive; holds back bytes that are half a character."""

    def __init__(self, tokenizer, out=None):
        self.tokenizer, self.out = tokenizer, out or sys.stdout
        self.ids: list[int] = []
        self.printed = 0
        self.text = ""                   # all decoded so far (printed or held back)

    def _text(self) -> str:
        # Special tokens (the EOS that ended the reply) are markers, not text to print.
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def put(self, token: int) -> None:
        self.ids.append(int(token))
        text = self.text = self._text()
        if text.endswith("\ufffd"):      # an incomplete UTF-8 sequence: wait for more
            return
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = len(text)

    def end(self) -> None:
        self.out.write(self._text()[self.printed:] + "\n")
        self.out.flush()


def load_model(args, checkpoint: Path):
    from retention.backends import get_backend
    backend = get_backend(args.backend)
    if backend.name == "torch":
        import torch
        if args.threads:
            torch.set_num_threads(args.threads)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        return backend.load_model(checkpoint, dtype=args.dtype, device=device)
    if args.device:
        raise ValueError("--device is for the torch backend; MLX uses its default device")
    return backend.load_model(checkpoint, dtype=args.dtype)


def run_generate(args) -> int:
    from retention.generation import prompt_state, stream_generate
    from retention.prompt_state import PromptState
    from retention.checkpoint import resolve_checkpoint
    checkpoint = resolve_checkpoint(args.checkpoint)
    tokenizer = load_checkpoint_tokenizer(checkpoint)
    prompt = read_prompt(args)
    model = load_model(args, checkpoint)
    ids = encode(tokenizer, prompt)

    state = PromptState.load(args.load_state, model.config) if args.load_state else None
    loaded_tokens = state.offset if state is not None else 0   # --save-state replaces `state`
    if not ids and (state is None or state.logits is None):
        raise ValueError("the prompt is empty; give some text (or --load-state a saved prompt)")
    stops = [encode(tokenizer, s) for s in args.stop if s]
    if not args.ignore_eos and eos_id(tokenizer) is not None:
        stops.append([eos_id(tokenizer)])

    prefill_tokens, prefill_seconds = 0, 0.0
    if args.save_state:  # prefill here so the state can be saved before decoding
        t0 = time.perf_counter()
        if ids:
            state = prompt_state(model, ids, state=state)
        prefill_seconds, prefill_tokens = time.perf_counter() - t0, len(ids)
        state.save(args.save_state)
        ids = []
    stream = stream_generate(model, ids, args.max_new_tokens, temperature=args.temperature,
                             top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                             repetition_penalty=args.repetition_penalty, stop=stops or None,
                             seed=args.seed, state=state)
    streamer = TextStreamer(tokenizer)
    stop_texts = [s for s in args.stop if s]
    for token in stream:
        streamer.put(token)
        # Token stops miss a text tokenized otherwise in context (" cat" vs "cat"), or one
        # that ends inside a token: match the decoded text too.
        if stop_texts and any(s in streamer.text for s in stop_texts):
            stream.stop()
    streamer.end()

    stats = stream.result.stats
    prefill_tokens += stats.prompt_tokens
    prefill_seconds += stats.prefill_seconds
    report = [f"prompt: {prefill_tokens} tokens"
              + (f" (after a saved state of {loaded_tokens} tokens)" if args.load_state else ""),
              f"prefill: {prefill_tokens / prefill_seconds:.1f} tokens/s" if prefill_seconds
              else "prefill: -",
              f"decode: {stats.new_tokens} tokens, {stats.decode_tokens_per_second:.1f} tokens/s",
              f"state: {(stats.state_bytes or (state.nbytes if state else 0)) / 2**20:.2f} MiB "
              "(fixed, whatever the context length)"]
    if args.save_state:
        report.append(f"saved the prompt state to {args.save_state}")
    print("\n".join(report), file=sys.stderr)
    return 0
