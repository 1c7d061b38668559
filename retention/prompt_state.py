"""PromptState: the recurrent state after a prompt, as host NumPy arrays any backend can load.

A power-retention model's whole context is (S [B,H,D,d], z [B,H,D]) per layer plus the number
of tokens seen (the RoPE offset of the next token), so a long system prompt can be prefilled
once, saved, and continued many times on either backend. The file is safetensors:
`layers.{i}.S`, `layers.{i}.z`, optional `logits` (the prompt's last-position logits, so
generation can start without re-reading a token), and metadata {offset, config_hash,
n_layers, format}.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retention.config import ModelConfig
from retention.reference import feature_dim

STATE_FORMAT = "retention-prompt-state-v1"


def config_hash(config: ModelConfig) -> str:
    """Fingerprint of the model spec a state belongs to (weights are not hashed: too slow)."""
    return hashlib.sha256(config.to_json().encode()).hexdigest()[:16]


@dataclass
class PromptState:
    """Per-layer (S [B,H,D,d], z [B,H,D]) float32, the tokens seen, optional last logits [B,V]."""
    layers: list[tuple[np.ndarray, np.ndarray]]
    offset: int
    logits: np.ndarray | None = None
    config_hash: str | None = field(default=None)

    @property
    def batch_size(self) -> int:
        return int(self.layers[0][0].shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of the recurrent state (not the logits): independent of the context length."""
        return sum(S.nbytes + z.nbytes for S, z in self.layers)

    def copy(self) -> "PromptState":
        logits = None if self.logits is None else self.logits.copy()
        return PromptState([(S.copy(), z.copy()) for S, z in self.layers], self.offset, logits,
                           self.config_hash)

    def rows(self, index) -> "PromptState":
        """The states of some batch rows (a list of row indices), as a new PromptState."""
        index = np.asarray(index, dtype=np.int64)
        logits = None if self.logits is None else self.logits[index]
        return PromptState([(S[index], z[index]) for S, z in self.layers], self.offset, logits,
                           self.config_hash)

    def expand(self, batch: int) -> "PromptState":
        """This state for `batch` rows: itself when sizes match, row 0 repeated when B == 1."""
        if self.batch_size == batch:
            return self
        if self.batch_size != 1:
            raise ValueError(f"the prompt state holds {self.batch_size} rows but {batch} prompts "
                             "were given; pass a state with 1 row (shared) or one per prompt")
        return self.rows([0] * batch)

    def check(self, config: ModelConfig) -> None:
        """Raise ValueError unless this state fits a model with `config`."""
        if self.config_hash is not None and self.config_hash != config_hash(config):
            raise ValueError("this prompt state was made by a model with a different config; "
                             "prefill the prompt again with this model")
        D = feature_dim(config.head_dim, config.degree)
        B = self.batch_size
        want_S, want_z = (B, config.n_kv_heads, D, config.head_dim), (B, config.n_kv_heads, D)
        if len(self.layers) != config.n_layers:
            raise ValueError(f"prompt state has {len(self.layers)} layers, the model "
                             f"{config.n_layers}")
        for i, (S, z) in enumerate(self.layers):
            if S.shape != want_S or z.shape != want_z:
                raise ValueError(f"prompt state layer {i} has shapes {S.shape}, {z.shape}; the "
                                 f"model needs {want_S}, {want_z}")

    # --- files ----------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        from safetensors.numpy import save_file
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for i, (S, z) in enumerate(self.layers):
            tensors[f"layers.{i}.S"] = np.ascontiguousarray(S, dtype=np.float32)
            tensors[f"layers.{i}.z"] = np.ascontiguousarray(z, dtype=np.float32)
        if self.logits is not None:
            tensors["logits"] = np.ascontiguousarray(self.logits, dtype=np.float32)
        metadata = {"format": STATE_FORMAT, "offset": str(int(self.offset)),
                    "n_layers": str(len(self.layers)), "config_hash": self.config_hash or ""}
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.replace(path)  # a crash never leaves half a state file under the real name
        return path

    @classmethod
    def load(cls, path: str | Path, config: ModelConfig | None = None) -> "PromptState":
        """Read a state file written by either backend; check it against `config` if given."""
        from safetensors import SafetensorError, safe_open
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no prompt state file at {path}")
        try:
            with safe_open(str(path), framework="numpy") as f:
                metadata = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path} is not a readable safetensors file ({e})") from None
        if metadata.get("format") != STATE_FORMAT:
            raise ValueError(f"{path} is not a retention prompt state (format "
                             f"{metadata.get('format')!r}, expected {STATE_FORMAT!r})")
        n_layers = int(metadata["n_layers"])
        try:
            layers = [(tensors[f"layers.{i}.S"], tensors[f"layers.{i}.z"])
                      for i in range(n_layers)]
        except KeyError as e:
            raise ValueError(f"{path} is missing tensor {e}; the file is incomplete") from None
        state = cls(layers, int(metadata["offset"]), tensors.get("logits"),
                    metadata.get("config_hash") or None)
        if config is not None:
            state.check(config)
        return state
