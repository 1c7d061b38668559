"""Offline, hermetic settings for the data tests: the Hub is off, Hugging Face caches and
retention's cache (built-in corpus, default tokenizer) live in a temporary folder."""
import os

import pytest

# Set at import, before any test imports datasets (which reads them once).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"


@pytest.fixture(scope="session", autouse=True)
def offline_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("data-env")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HOME", str(root / "hf"))
        mp.setenv("HF_DATASETS_CACHE", str(root / "hf" / "datasets"))
        mp.setenv("RETENTION_CACHE", str(root / "retention-cache"))
        mp.delenv("RETENTION_GPT2_DIR", raising=False)
        yield root


@pytest.fixture(scope="session")
def tok(offline_env):
    """The default tokenizer, trained once per session into the temporary cache."""
    from retention.data.tokenizer import default_tokenizer
    return default_tokenizer()


@pytest.fixture(scope="session")
def small_tok():
    """A tiny byte-level BPE for tests that only need some tokenizer, fast."""
    from retention.data.tokenizer import train_bpe
    text = ("The quick brown fox jumps over the lazy dog. " * 20 +
            "A journey of a thousand miles begins with a single step. " * 20)
    return train_bpe([text] * 5, vocab_size=400, name="small")

