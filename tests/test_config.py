"""MistralConfig against transformers' own configs: defaults, files both ways, validation errors."""

from __future__ import annotations

import json

import pytest

from mistral_lm import ConfigError, MistralConfig

from .conftest import TINY, tiny_config

transformers = pytest.importorskip("transformers")

# Keys of transformers' to_dict() that are its own bookkeeping, not model hyper-parameters
# (`architectures` is compared as an attribute: we omit it from the dict while it is None).
HF_BOOKKEEPING = {"transformers_version", "_name_or_path", "dtype", "chunk_size_feed_forward", "is_encoder_decoder",
                  "architectures"}

# Mistral-7B-v0.1's config.json as published on the Hub (written by transformers 4.34).
MISTRAL_7B_V01 = {
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
    "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.34.0.dev0", "use_cache": True, "vocab_size": 32000,
}


def _normalized(d: dict) -> dict:
    """to_dict() of either library with label maps keyed alike (JSON turns int keys into str)."""
    d = dict(d)
    if "id2label" in d:
        d["id2label"] = {int(k): v for k, v in d["id2label"].items()}
    return d


def assert_same_fields(ours: MistralConfig, ref) -> None:
    a, b = _normalized(ours.to_dict()), _normalized(ref.to_dict())
    missing = set(b) - set(a) - HF_BOOKKEEPING
    assert not missing, f"fields of transformers' config we do not model: {missing}"
    differing = {k: (a[k], b[k]) for k in set(a) & set(b) if a[k] != b[k]}
    assert not differing, differing
    assert ours.rope_theta == ref.rope_parameters["rope_theta"]
    assert ours.architectures == ref.architectures


# ------------------------------------------------------------------ defaults and files
def test_defaults_equal_transformers_mistral_config():
    assert_same_fields(MistralConfig(), transformers.MistralConfig())


def test_defaults_are_not_vacuous():
    """The comparison above covers the fields that define Mistral-7B (guards against an empty intersection)."""
    shared = set(MistralConfig().to_dict()) & set(transformers.MistralConfig().to_dict())
    assert {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "sliding_window", "rms_norm_eps", "max_position_embeddings",
            "hidden_act", "tie_word_embeddings", "bos_token_id", "eos_token_id", "rope_parameters"} <= shared


def test_json_round_trip_keeps_unknown_keys(tmp_path):
    extra = {"quantization_config": {"quant_method": "awq", "bits": 4}, "my_note": "kept", "pretraining_tp": 1}
    config = MistralConfig.from_dict({**TINY, "sliding_window": 6, "rope_theta": 5e5, **extra})
    assert config.extra == extra
    config.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert {k: written[k] for k in extra} == extra
    again = MistralConfig.from_pretrained(tmp_path)
    assert again == config
    assert again.extra == extra
    assert MistralConfig.from_dict(config.to_dict()) == config


def test_transformers_reads_our_config_json(tmp_path):
    config = tiny_config(sliding_window=6, rope_theta=5e5, head_dim=24, tie_word_embeddings=True)
    config.save_pretrained(tmp_path)
    assert_same_fields(config, transformers.MistralConfig.from_pretrained(tmp_path))


def test_transformers_saved_mistral_config_loads_with_same_values(tmp_path):
    ref = transformers.MistralConfig(
        vocab_size=1000, hidden_size=96, intermediate_size=200, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=8192, rms_norm_eps=1e-5, sliding_window=None,
        rope_theta=1e6, tie_word_embeddings=True, bos_token_id=5, eos_token_id=6, pad_token_id=0,
    )
    ref.save_pretrained(tmp_path)
    ours = MistralConfig.from_pretrained(tmp_path)
    assert_same_fields(ours, ref)
    assert (ours.sliding_window, ours.rope_theta, ours.head_dim) == (None, 1e6, 32)


def test_transformers_saved_llama_config_loads_without_window(tmp_path):
    ref = transformers.LlamaConfig(
        vocab_size=1000, hidden_size=96, intermediate_size=200, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=3, rope_theta=5e5, tie_word_embeddings=True,
    )
    ref.save_pretrained(tmp_path)
    assert "sliding_window" not in json.loads((tmp_path / "config.json").read_text())
    ours = MistralConfig.from_pretrained(tmp_path)
    assert ours.model_type == "llama"
    assert ours.sliding_window is None  # Llama attends to the whole causal prefix
    assert_same_fields(ours, ref)
    assert ours.extra["pretraining_tp"] == 1  # a Llama-only key, kept for the round trip


def test_published_mistral_7b_config_reads_like_transformers():
    ours = MistralConfig.from_dict(MISTRAL_7B_V01)
    ref = transformers.MistralConfig.from_dict(MISTRAL_7B_V01)
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "sliding_window",
                 "vocab_size", "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert getattr(ours, name) == getattr(ref, name), name
    assert ours.rope_theta == ref.rope_parameters["rope_theta"] == 10000.0


def test_missing_num_key_value_heads_means_multi_head_attention():
    ref = transformers.MistralConfig.from_dict({k: v for k, v in MISTRAL_7B_V01.items() if k != "num_key_value_heads"})
    ours = MistralConfig.from_dict({k: v for k, v in MISTRAL_7B_V01.items() if k != "num_key_value_heads"})
    assert ours.num_key_value_heads == ref.num_key_value_heads
    assert MistralConfig(num_key_value_heads=None).num_key_value_heads == 32


# ------------------------------------------------------------------ validation
def _error(**overrides) -> str:
    with pytest.raises(ConfigError) as info:
        tiny_config(**overrides)
    assert isinstance(info.value, ValueError)
    return str(info.value)


@pytest.mark.parametrize(("field", "value"), [
    ("hidden_size", 0), ("hidden_size", -64), ("vocab_size", 0), ("intermediate_size", -1),
    ("num_hidden_layers", 0), ("num_attention_heads", -4), ("num_key_value_heads", 0),
    ("max_position_embeddings", 0), ("head_dim", -8),
])
def test_non_positive_size_is_rejected_naming_field_and_value(field, value):
    message = _error(**{field: value})
    assert field in message and repr(value) in message


@pytest.mark.parametrize(("field", "value"), [
    ("hidden_size", True), ("num_hidden_layers", "2"), ("vocab_size", 128.0), ("num_attention_heads", 4.5),
    ("num_key_value_heads", False), ("intermediate_size", "128"), ("sliding_window", 4.0), ("head_dim", True),
])
def test_wrong_type_where_int_expected_is_rejected(field, value):
    message = _error(**{field: value})
    assert field in message and repr(value) in message


def test_heads_not_dividing_hidden_size_is_rejected():
    message = _error(hidden_size=64, num_attention_heads=5, num_key_value_heads=1)
    assert "hidden_size" in message and "num_attention_heads" in message and "64" in message and "5" in message


def test_kv_heads_not_dividing_heads_is_rejected():
    message = _error(num_attention_heads=4, num_key_value_heads=3)
    assert "num_key_value_heads" in message and "(3)" in message and "(4)" in message


@pytest.mark.parametrize("window", [-1, 0])
def test_non_positive_sliding_window_is_rejected(window):
    message = _error(sliding_window=window)
    assert "sliding_window" in message and repr(window) in message


def test_unknown_activation_is_rejected():
    message = _error(hidden_act="swiglu")
    assert "hidden_act" in message and "'swiglu'" in message


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn", "llama3"])
def test_unsupported_rope_scaling_type_is_rejected(key, kind):
    message = _error(**{key: {"rope_type": kind, "factor": 2.0, "rope_theta": 1e4}})
    assert "rope" in message and repr(kind) in message


def test_odd_head_dim_is_rejected():
    assert "head_dim" in _error(head_dim=15)


def test_explicit_head_dim_allows_heads_not_dividing_hidden_size():
    """Shapes follow transformers' model for the same config (q_proj is heads * head_dim wide)."""
    from mistral_lm import MistralForCausalLM

    fields = dict(hidden_size=60, num_attention_heads=5, num_key_value_heads=1, head_dim=16)
    config = tiny_config(**fields)
    assert config.head_dim == 16
    ref = transformers.MistralForCausalLM(transformers.MistralConfig(**{**TINY, **fields}))
    ours = MistralForCausalLM(config)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_rope_theta_from_rope_parameters_and_legacy_key_agree():
    assert tiny_config(rope_parameters={"rope_type": "default", "rope_theta": 5e5}).rope_theta == 5e5
    assert tiny_config(rope_theta=5e5).rope_parameters == {"rope_type": "default", "rope_theta": 5e5}


def test_explicit_num_labels_wins_over_id2label_like_transformers():
    data = {**MISTRAL_7B_V01, "id2label": {"0": "neg", "1": "pos"}, "num_labels": 3}
    with pytest.warns(UserWarning, match="num_labels"):
        ours = MistralConfig.from_dict(data)
    ref = transformers.MistralConfig.from_dict(data)
    assert ours.num_labels == ref.num_labels == 3
    assert ours.id2label == {int(k): v for k, v in ref.id2label.items()}


def test_id2label_sets_num_labels_like_transformers():
    data = {**MISTRAL_7B_V01, "id2label": {"0": "neg", "1": "pos", "2": "neutral"}}
    ours, ref = MistralConfig.from_dict(data), transformers.MistralConfig.from_dict(data)
    assert ours.num_labels == ref.num_labels == 3
    assert ours.id2label == {int(k): v for k, v in ref.id2label.items()}
