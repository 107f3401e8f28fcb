"""Accuracy of reduced-precision modes against float32, teacher-forced on 2,000 tokens of English.

The text is CPython's pydoc topics (see `reference_text_ids`), the model the embedded SmolLM2
GGUF, the reference its float32 load. Every mode is scored once per module (a few seconds
each) and shared by the tests that read its numbers.

Measured on 2,000 tokens (Python 3.11, x86 AVX2, 2 threads, torch 2.13; two runs, before and
after a change of the model's bfloat16 code path, which moved near ties); bounds keep a margin:

| mode        | top-1 agreement | on decisive positions | perplexity (fp32 12.13) |
|-------------|-----------------|-----------------------|-------------------------|
| bf16        | 0.973-0.974     | 0.993-0.994           | +0.23-0.27 %            |
| int8        | 0.972           | 0.991-0.992           | +0.37-0.43 %            |
| gguf-native | 0.969-0.973     | 0.993-0.995           | +0.22-0.23 %            |
| int4 (g32)  | 0.978-0.984     | 0.993-0.999           | +0.31-0.38 %            |
| int4-g64    | 0.775           | 0.794-0.795           | +32 %                   |
| nf4 (g64)   | 0.766-0.771     | 0.783-0.788           | +26-27 %                |

On an AMD EPYC with AVX-512 (BF16, VNNI) and no AMX, default kernels / ATEN_CPU_CAPABILITY=avx2:
bf16 0.9795 / 0.976 (decisive 0.9958 both), int8 0.9665 / 0.9685 (decisive 0.9878 both),
gguf-native 0.9705 / 0.971 (decisive 0.9936 / 0.9915). On an Intel Xeon with AMX, at one / two
torch threads: bf16 0.976 both (decisive 0.9963 / 0.9947), int8 0.964 / 0.965 (0.9851 / 0.9873),
gguf-native 0.9735 both (0.991 both).

Why not 99 % top-1 for int8: 5.7 % of positions are near ties (float32's top-1 beats its top-2
by < 0.1 nats), and those flip under any rounding: loading in bfloat16 alone agrees on only
97.3-97.4 %, int8 with float32 compute on 97.6 %. So int8 is held to the sum of its two
roundings' flips (its weights' and bfloat16's), and to >= 98 % on the decisive positions. Why
int4 groups 32 by default and nf4 misses 95 %: this checkpoint is itself Q4_1 (blocks of 32);
groups of 64 re-quantize two blocks on one coarser grid, compounding two 4-bit roundings
(relative weight error 0.079 vs 0.004 for groups of 32). int4 with groups of 32 lands on the
file's own grid and reaches 97.8-98.4 %; no nf4 block size matches the affine Q4_1 grid (80 %
with 32).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mistral_lm import AutoTokenizer, BitsAndBytesConfig, MistralForCausalLM
from mistral_lm.errors import ConfigError, InputError
from mistral_lm.evaluation import (
    MODES,
    TokenScores,
    compare,
    mode_kwargs,
    perplexity,
    reference_text_ids,
    token_logprobs,
)
from .conftest import default_model_or_skip, tiny_config, torch_threads

# its tests share costly module fixtures: one xdist worker runs them all (make test's --dist loadgroup)
pytestmark = pytest.mark.xdist_group("accuracy")

N_TOKENS = 2000


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model_path() -> Path:
    return default_model_or_skip()


@pytest.fixture(scope="module")
def text_ids(model_path: Path) -> torch.Tensor:
    return reference_text_ids(AutoTokenizer.from_pretrained(model_path), N_TOKENS)


@pytest.fixture(scope="module")
def fp32_model(model_path: Path) -> MistralForCausalLM:
    return MistralForCausalLM.from_pretrained(model_path)


# roundings that are not modes of their own: the parts a mode's error is made of
ROUNDINGS = {
    "int8-fp32": lambda: {"quantization_config": BitsAndBytesConfig(load_in_8bit=True), "torch_dtype": torch.float32},
}


@pytest.fixture(scope="module")
def scores(model_path: Path, fp32_model: MistralForCausalLM, text_ids: torch.Tensor):
    """mode -> TokenScores on the 2,000 tokens, each computed on first use and kept; models are not kept."""
    cache: dict[str, TokenScores] = {}

    def get(mode: str) -> TokenScores:
        if mode not in cache:
            if mode == "fp32":
                model = fp32_model
            else:
                kwargs = ROUNDINGS[mode]() if mode in ROUNDINGS else mode_kwargs(mode)
                model = MistralForCausalLM.from_pretrained(model_path, **kwargs)
            with torch_threads(2):  # compute-bound: two threads even where make test gives each worker one
                cache[mode] = token_logprobs(model, text_ids)
        return cache[mode]

    return get


@pytest.fixture
def tiny_model() -> MistralForCausalLM:
    return MistralForCausalLM(tiny_config(sliding_window=None)).eval()


def _full_forward_scores(model: MistralForCausalLM, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent reference: one forward without a cache, then torch's cross_entropy and argmax."""
    with torch.no_grad():
        logits = model(ids[:, :-1], use_cache=False).logits[0].float()
    nll = F.cross_entropy(logits, ids[0, 1:], reduction="none")
    return nll, logits


# --------------------------------------------------------------------------- the text
def test_reference_text_is_the_sorted_pydoc_topics(model_path: Path, text_ids: torch.Tensor) -> None:
    from pydoc_data.topics import topics

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    assert text_ids.shape == (1, N_TOKENS + 1) and text_ids.dtype == torch.long
    decoded = tokenizer.decode(text_ids[0].tolist())
    source = "\n\n".join(topics[key] for key in sorted(topics))
    assert len(decoded) > 4000 and source.startswith(decoded)


# --------------------------------------------------------------------------- properties of the evaluator
def test_perplexity_is_exp_mean_cross_entropy(fp32_model: MistralForCausalLM, text_ids: torch.Tensor) -> None:
    ids = text_ids[:, :100]
    nll, logits = _full_forward_scores(fp32_model, ids)
    got = token_logprobs(fp32_model, ids)
    assert got.tokens == 99
    torch.testing.assert_close(got.logprobs, -nll, atol=1e-4, rtol=1e-4)
    assert perplexity(got) == pytest.approx(math.exp(float(nll.mean())), rel=1e-5)
    assert torch.equal(got.predictions, logits.argmax(-1))
    top2 = logits.log_softmax(-1).topk(2, dim=-1).values
    torch.testing.assert_close(got.margins, top2[:, 0] - top2[:, 1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("chunk_size", [7, 64])
def test_chunked_equals_one_chunk(fp32_model: MistralForCausalLM, text_ids: torch.Tensor, chunk_size: int) -> None:
    ids = text_ids[:, :100]
    whole = token_logprobs(fp32_model, ids, chunk_size=1000)
    chunked = token_logprobs(fp32_model, ids, chunk_size=chunk_size)
    torch.testing.assert_close(chunked.logprobs, whole.logprobs, atol=1e-4, rtol=1e-4)
    assert torch.equal(chunked.predictions, whole.predictions)
    assert torch.equal(chunked.targets, whole.targets)


@pytest.mark.parametrize("chunk_size", [1, 3, 5, 8, 100])
def test_chunks_through_a_rolling_window_cache(chunk_size: int) -> None:
    """Window 5 < sequence: chunks smaller, equal and larger than the window all match a full forward."""
    model = MistralForCausalLM(tiny_config(sliding_window=5)).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 30))
    nll, logits = _full_forward_scores(model, ids)
    got = token_logprobs(model, ids, chunk_size=chunk_size)
    torch.testing.assert_close(got.logprobs, -nll, atol=1e-5, rtol=1e-5)
    assert torch.equal(got.predictions, logits.argmax(-1))


def test_compare_against_itself_and_a_uniform_model(tiny_model: MistralForCausalLM) -> None:
    ids = torch.randint(0, tiny_model.config.vocab_size, (1, 40))
    own = token_logprobs(tiny_model, ids)
    same = compare(own, own)
    assert (same.top1_agreement, same.decisive_agreement, same.ppl_increase) == (1.0, 1.0, 0.0)
    assert same.tokens == 39 and same.decisive_tokens == int((own.margins >= 0.1).sum())
    # A model with zero logits predicts uniformly: perplexity is exactly the vocabulary size.
    uniform = MistralForCausalLM(tiny_config(sliding_window=None)).eval()
    torch.nn.init.zeros_(uniform.lm_head.weight)
    flat = token_logprobs(uniform, ids)
    assert perplexity(flat) == pytest.approx(tiny_model.config.vocab_size, rel=1e-5)
    assert torch.all(flat.margins == 0) and torch.all(flat.predictions == 0)  # ties go to the lowest id
    result = compare(flat, own)
    assert result.ppl_increase == pytest.approx(tiny_model.config.vocab_size / perplexity(own) - 1, rel=1e-5)


# --------------------------------------------------------------------------- input errors
def test_input_errors(tiny_model: MistralForCausalLM) -> None:
    vocab = tiny_model.config.vocab_size
    for bad in (torch.tensor([[3]]), torch.zeros(1, 0, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long),
                torch.zeros(1, 5), torch.zeros(1, 1, 5, dtype=torch.long), [[1, 2, 3]],
                torch.tensor([[1, vocab]]), torch.tensor([[-1, 2]])):
        with pytest.raises(InputError):
            token_logprobs(tiny_model, bad)
    for chunk in (0, -1, True, 2.0):
        with pytest.raises(InputError, match="chunk_size"):
            token_logprobs(tiny_model, torch.tensor([[1, 2, 3]]), chunk_size=chunk)
    a = token_logprobs(tiny_model, torch.tensor([1, 2, 3, 4]))  # 1-D is one sequence
    with pytest.raises(InputError, match="same token sequence"):
        compare(a, token_logprobs(tiny_model, torch.tensor([1, 2, 3, 5])))
    with pytest.raises(InputError, match="same token sequence"):
        compare(a, token_logprobs(tiny_model, torch.tensor([1, 2, 3])))
    with pytest.raises(InputError, match="decisive_margin"):
        compare(a, a, decisive_margin=-1.0)
    with pytest.raises(ConfigError, match="unknown mode"):
        mode_kwargs("fp16")
    with pytest.raises(InputError, match="n_tokens"):
        reference_text_ids(None, 0)


# --------------------------------------------------------------------------- accuracy of each mode
def test_float32_reference_predicts_english(scores) -> None:
    """Sanity of the whole pipeline: a uniform guess scores 49,152; SmolLM2 on these docs ~12."""
    ref = scores("fp32")
    assert ref.tokens == N_TOKENS
    assert perplexity(ref) < 25
    assert float((ref.predictions == ref.targets).double().mean()) > 0.4  # greedy guesses the next token


# mode -> (min top-1 agreement, min agreement on decisive positions, max relative perplexity increase);
# measured values in the module docstring. Raw agreement moves with near ties (a change of kernel
# or summation order flips a few), hence its wider margin; the decisive and perplexity bounds are
# the tight ones.
BOUNDS = {
    "bf16": (0.955, 0.985, 0.01),
    "int8": (0.955, 0.98, 0.01),  # decisive 0.985-0.988 (int8 1.5 % at one thread); see the two-roundings test
    "gguf-native": (0.955, 0.985, 0.01),  # same weights as float32; only bfloat16 compute differs
    "int4": (0.95, 0.99, 0.01),  # the goal's 4-bit bar, met by groups aligned with the file's blocks
    "int4-g64": (0.70, 0.70, 0.45),  # re-quantized Q4_1 on a coarser grid (module docstring)
    "nf4": (0.70, 0.70, 0.40),  # goal missed (module docstring); guards regressions
}
assert set(BOUNDS) | {"fp32"} == set(MODES)


# The format's own accuracy on this file, not our code's: tests/test_quantization.py holds our
# nf4 and int4 layers to their formats' definitions on random shapes in a fraction of the time.
FORMAT_MEASUREMENT = pytest.mark.format_measurement


@pytest.mark.parametrize("mode", [pytest.param(m, marks=FORMAT_MEASUREMENT) if m in ("int4-g64", "nf4") else m
                                  for m in BOUNDS])
def test_mode_accuracy_against_float32(scores, mode: str) -> None:
    min_agree, min_decisive, max_increase = BOUNDS[mode]
    result = compare(scores(mode), scores("fp32"))
    assert result.tokens == N_TOKENS
    assert result.decisive_tokens > 0.9 * N_TOKENS
    assert result.top1_agreement >= min_agree, result
    assert result.decisive_agreement >= min_decisive, result
    assert -0.01 < result.ppl_increase < max_increase, result


def test_gguf_blocks_no_worse_than_bfloat16(scores) -> None:
    """GGUF blocks (the file's own weights, each linear's input on an 8-bit grid) flip no more
    than 1 % more decisive top-1 predictions than plain bfloat16 weights do. Decisive positions
    only: near ties flip with any change of kernel (the same CPU moved bfloat16's raw agreement
    by 0.35 % between its AVX-512 and AVX2 kernels), while the decisive agreements did not move."""
    floor = compare(scores("bf16"), scores("fp32")).decisive_agreement
    assert compare(scores("gguf-native"), scores("fp32")).decisive_agreement >= floor - 0.01


def test_int8_flips_no_more_than_its_two_roundings(scores) -> None:
    """int8 is two roundings: each weight row on 255 levels, and bfloat16 compute. Its decisive
    flips are at most the sum of theirs, each measured alone, give or take the count's own noise:
    a flip count of k on ~1,900 decisive positions varies by about sqrt(k), so the bound allows
    three of those on the sum. A fixed 0.5 % margin (9 positions) failed by 2 positions on an AVX2
    EPYC under xdist: int8 1.75 %, int8 weights in float32 0.90 %, bfloat16 0.27 %. On a Xeon at
    one and at two torch threads: int8 1.49 / 1.27 %, int8-fp32 0.80 / 0.90 %, bf16 0.37 / 0.53 %."""
    def flips(mode: str) -> tuple[float, int]:
        result = compare(scores(mode), scores("fp32"))
        return 1.0 - result.decisive_agreement, result.decisive_tokens

    (combined, n), (weights, _), (compute, _) = flips("int8"), flips("int8-fp32"), flips("bf16")
    alone = weights + compute
    assert combined <= alone + 3 * math.sqrt(alone / n), (combined, weights, compute, n)


@pytest.mark.xfail(strict=True, reason="re-quantizing this Q4_1 file's 32-blocks on a coarser or "
                                       "non-affine grid (see module docstring); int4 meets the goal")
@FORMAT_MEASUREMENT
@pytest.mark.parametrize("mode", ["int4-g64", "nf4"])
def test_goal_4bit_default_groups(scores, mode: str) -> None:
    assert compare(scores(mode), scores("fp32")).top1_agreement >= 0.95
