import json

import pytest

from retention import ModelConfig, create_model_config
from retention.config import PRESET_TARGETS, PRESETS
from retention.params import count_parameters, parameter_shapes


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_sizes_within_ten_percent(name):
    config = create_model_config(name)
    assert config.vocab_size == 50304
    n = count_parameters(config)
    assert abs(n / PRESET_TARGETS[name] - 1) < 0.10, (name, n)
    assert config.num_parameters() == n


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="tiny, small, medium, large, 7b"):
        create_model_config("huge")


def test_preset_overrides():
    config = create_model_config("tiny", vocab_size=8192)
    assert config.vocab_size == 8192 and config.d_model == PRESETS["tiny"]["d_model"]


def test_json_round_trip(tmp_path):
    config = ModelConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                         head_dim=8, mlp_hidden=64, tie_embeddings=False, degree=4)
    data = json.loads(config.to_json())
    assert data["format_version"] == 1
    assert ModelConfig.from_json(config.to_json()) == config
    config.save(tmp_path / "config.json")
    assert ModelConfig.load(tmp_path) == config


@pytest.mark.parametrize("field,value,message", [
    ("degree", 3, "degree"), ("degree", 0, "degree"), ("degree", 1, "degree"),
    ("n_kv_heads", 5, "multiple of n_kv_heads"), ("d_model", 0, "d_model"),
    ("head_dim", -4, "head_dim"), ("vocab_size", 2.5, "vocab_size"),
    ("chunk_size", 0, "chunk_size"), ("norm_eps", 0.0, "norm_eps"),
])
def test_validation_names_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{field: value})


def test_unknown_keys_rejected(tmp_path):
    data = ModelConfig().to_dict()
    data["n_embd"] = 768
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="n_embd"):
        ModelConfig.load(tmp_path / "config.json")


def test_newer_format_version_rejected():
    data = ModelConfig().to_dict()
    data["format_version"] = 99
    with pytest.raises(ValueError, match="upgrade"):
        ModelConfig.from_dict(data)


def test_parameter_names_follow_hf_llama_convention():
    config = create_model_config("tiny", n_layers=2)
    shapes = parameter_shapes(config)
    assert shapes["model.embed_tokens.weight"] == (50304, 256)
    assert shapes["model.layers.1.self_attn.g_proj.weight"] == (4, 256)
    assert shapes["model.layers.0.self_attn.q_norm.weight"] == (64,)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (256, 1280)
    assert "lm_head.weight" not in shapes
    untied = parameter_shapes(config.replace(tie_embeddings=False))
    assert untied["lm_head.weight"] == (50304, 256)
