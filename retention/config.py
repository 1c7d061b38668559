"""The model spec: one frozen dataclass that every backend builds from, with JSON round trip."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path

CONFIG_FORMAT_VERSION = 1


@dataclass(frozen=True)
class ModelConfig:
    """Shape and hyperparameters of a RetentionLLM (DESIGN section 2)."""

    vocab_size: int = 50304
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int = 12
    head_dim: int = 64
    degree: int = 2
    chunk_size: int = 128
    mlp_hidden: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    gate_bias: float = 6.906768  # logsigmoid(6.906768) ~ log(0.999): gates start near 1
    tie_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
                     "head_dim", "chunk_size", "mlp_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.degree, int) or self.degree < 2 or self.degree % 2:
            raise ValueError(
                f"ModelConfig.degree must be an even integer >= 2 (2 or 4), got {self.degree!r}: "
                "odd degrees give negative attention weights")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig.n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                f"({self.n_kv_heads}); pick n_kv_heads from the divisors of n_heads")
        for name in ("rope_theta", "norm_eps", "init_std"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"ModelConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"ModelConfig.tie_embeddings must be true or false, "
                             f"got {self.tie_embeddings!r}")

    # --- derived sizes -------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def num_parameters(self) -> int:
        from retention.params import count_parameters
        return count_parameters(self)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # --- JSON round trip -----------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {"format_version": CONFIG_FORMAT_VERSION, "model_type": "retention"}
        out.update(dataclasses.asdict(self))
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        data = dict(data)
        version = data.pop("format_version", CONFIG_FORMAT_VERSION)
        data.pop("model_type", None)
        if version > CONFIG_FORMAT_VERSION:
            raise ValueError(f"config format_version {version} is newer than this package "
                             f"understands ({CONFIG_FORMAT_VERSION}); upgrade retention-llm")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys {unknown}; valid keys are {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"no model config at {path}")
        try:
            return cls.from_json(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None


# Sizes of the guide, counted at a 50,304-token vocabulary (tests check each within 10%).
PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=256, n_layers=8, n_heads=4, n_kv_heads=4, head_dim=64, mlp_hidden=1280),
    "small": dict(d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, head_dim=64,
                  mlp_hidden=2048),
    "medium": dict(d_model=1024, n_layers=24, n_heads=16, n_kv_heads=16, head_dim=64,
                   mlp_hidden=2816),
    "large": dict(d_model=1280, n_layers=36, n_heads=20, n_kv_heads=20, head_dim=64,
                  mlp_hidden=3456),
    "7b": dict(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128,
               mlp_hidden=11008, tie_embeddings=False),
}
PRESET_TARGETS = {"tiny": 23e6, "small": 125e6, "medium": 355e6, "large": 774e6, "7b": 7e9}


def create_model_config(name: str, **overrides) -> ModelConfig:
    """The preset `name` (tiny, small, medium, large, 7b), with any field overridden."""
    key = str(name).lower()
    if key not in PRESETS:
        raise ValueError(f"unknown model size {name!r}; valid sizes: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[key], **overrides})


# --- training ----------------------------------------------------------------------------

PRECISIONS = ("auto", "float32", "bfloat16")
SCHEDULES = ("cosine", "constant")


@dataclass
class TrainConfig:
    """One training run (docs/training.md). `model` is a preset name or a ModelConfig; with a
    preset name the vocabulary follows the tokenizer unless `model_overrides` sets it."""

    model: "str | ModelConfig" = "tiny"
    model_overrides: dict = dataclasses.field(default_factory=dict)
    data: "str | list[str]" = "builtin"       # source name/path, or several mixed by data_mix
    data_mix: "list[float] | None" = None      # weights of the sources (default: equal)
    tokenizer: "str | None" = None             # tokenizer path; None = the data's default
    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 100
    schedule: str = "cosine"                   # linear warmup, then cosine to min_lr
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    clip_norm: "float | None" = 1.0            # global gradient norm; None or 0 disables
    steps: "int | None" = 1000
    tokens: "int | None" = None                # instead of steps (wins when set): this many tokens
    eval_every: int = 200                      # 0 disables validation
    eval_batches: int = 8
    save_every: int = 500                      # 0: save only at the end
    keep_last: int = 3
    log_interval: int = 10
    precision: str = "auto"                    # auto | float32 | bfloat16
    seed: int = 0
    out_dir: str = "runs/retention"
    resume: "str | None" = None                # a checkpoint directory, a run directory or "latest"
    device: "str | None" = None                # torch: "cuda", "cuda:1", "cpu"; None = best
    max_nonfinite: int = 5                     # stop after this many non-finite steps in a row
    peak_flops: "float | None" = None          # device peak FLOP/s for MFU; None = table
    tensorboard: bool = True                   # write event files when tensorboard is installed
    wandb_project: "str | None" = None         # log to Weights & Biases when set and installed
    progress: bool = True                      # console progress bar
    activation_checkpointing: bool = False     # torch: recompute each layer in the backward
    compile: bool = False                      # torch: torch.compile each decoder layer
    fused_adamw: "bool | None" = None          # torch: fused AdamW kernel; None = on CUDA only

    def __post_init__(self):
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        if isinstance(self.model, dict):
            self.model = model_config_from_spec(self.model)
        for name in ("seq_len", "batch_size", "grad_accum"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.eval_batches, int) or isinstance(self.eval_batches, bool) \
                or self.eval_batches < 1:
            raise ValueError(f"TrainConfig.eval_batches must be a positive integer, got "
                             f"{self.eval_batches!r}; set eval_every = 0 to turn validation off")
        for name in ("warmup_steps", "eval_every", "save_every", "keep_last", "log_interval",
                     "max_nonfinite"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"TrainConfig.{name} must be an integer >= 0, got {value!r}")
        if self.steps is None and self.tokens is None:
            raise ValueError("TrainConfig needs `steps` or `tokens` to know when to stop")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps <= 0):
            raise ValueError(f"TrainConfig.steps must be a positive integer, got {self.steps!r}")
        if self.tokens is not None and (not isinstance(self.tokens, int) or self.tokens <= 0):
            raise ValueError(f"TrainConfig.tokens must be a positive integer, got {self.tokens!r}")
        if not self.lr > 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, "
                             f"min_lr={self.min_lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"TrainConfig.betas must be two numbers in [0, 1), got {self.betas}")
        if not self.eps > 0 or self.weight_decay < 0:
            raise ValueError("TrainConfig needs eps > 0 and weight_decay >= 0")
        if self.clip_norm is not None and self.clip_norm < 0:
            raise ValueError(f"TrainConfig.clip_norm must be >= 0 (0 disables), "
                             f"got {self.clip_norm}")
        if self.fused_adamw is not None and not isinstance(self.fused_adamw, bool):
            raise ValueError(f"TrainConfig.fused_adamw must be true, false or null (auto: on "
                             f"CUDA only), got {self.fused_adamw!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig.precision must be one of {PRECISIONS}, "
                             f"got {self.precision!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"TrainConfig.schedule must be one of {SCHEDULES}, "
                             f"got {self.schedule!r}")
        if isinstance(self.data, (list, tuple)):
            self.data = list(self.data)
            if not self.data:
                raise ValueError("TrainConfig.data is an empty list; name at least one source")
        if self.data_mix is not None:
            n = len(self.data) if isinstance(self.data, list) else 1
            if len(self.data_mix) != n or any(w < 0 for w in self.data_mix) \
                    or not sum(self.data_mix) > 0:
                raise ValueError(f"TrainConfig.data_mix needs {n} non-negative weights (one per "
                                 f"data source) with a positive sum, got {self.data_mix}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len

    @property
    def total_steps(self) -> int:
        if self.tokens is not None:  # steps has a default, so a token budget given wins
            return -(-self.tokens // self.tokens_per_step)
        return self.steps

    def model_config(self, vocab_size: int | None = None) -> ModelConfig:
        """The ModelConfig to build; a preset takes `vocab_size` (the tokenizer's) unless
        model_overrides names one."""
        if isinstance(self.model, ModelConfig):
            return self.model.replace(**self.model_overrides) if self.model_overrides \
                else self.model
        overrides = dict(self.model_overrides)
        if vocab_size is not None:
            overrides.setdefault("vocab_size", vocab_size)
        return create_model_config(self.model, **overrides)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, ModelConfig):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys {unknown}; valid keys are {sorted(known)}")
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        """Read a run.toml (or .json) file; its keys are TrainConfig fields."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no training config at {path}")
        if path.suffix == ".json":
            return cls.from_dict(json.loads(path.read_text()))
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path} is not valid TOML: {e}") from None
        return cls.from_dict(data)


def model_config_from_spec(spec: dict) -> ModelConfig:
    """A [model] table: either full ModelConfig fields or `preset = "tiny"` plus overrides."""
    spec = dict(spec)
    preset = spec.pop("preset", None)
    if preset is not None:
        return create_model_config(preset, **spec)
    return ModelConfig.from_dict(spec)
