"""Logits processors against their definitions, on crafted logits (property tests)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mistral_lm import sampling
from mistral_lm.errors import GenerationError

logits_rows = st.lists(st.floats(-20, 20, allow_nan=False, width=32), min_size=2, max_size=40)


@given(logits_rows, st.integers(1, 45))
def test_top_k_keeps_exactly_the_k_largest(row, k):
    logits = torch.tensor([row])
    kept = torch.isfinite(sampling.top_k_filter(logits, k))[0]
    kth = sorted(row, reverse=True)[min(k, len(row)) - 1]
    expected = torch.tensor([v >= kth for v in row])  # ties with the k-th value are kept
    assert torch.equal(kept, expected)


@given(logits_rows, st.floats(0.01, 1.0))
# ties past 16 values, where torch's default sort is not stable: which tied token goes must be defined
@example([3.0, 0.0, 20.0, 3.0, 3.0, 20.0, 3.0, 20.0, 17.0, 17.0, 20.0, 17.0, 0.0, 20.0, 17.0, 20.0, 0.0, 0.0, 20.0,
          3.0, 0.0, 20.0, 3.0, 20.0, 17.0, 3.0], 0.5)
def test_top_p_keeps_smallest_prefix_reaching_p(row, p):
    logits = torch.tensor([row])
    kept = torch.isfinite(sampling.top_p_filter(logits, p))[0]
    probs = logits.softmax(-1)[0]
    # definition: a token is dropped iff the tokens less likely than it (strictly after it in
    # ascending order) plus itself carry at most 1 - p of the mass
    order = torch.argsort(logits[0], stable=True)
    cum = probs[order].cumsum(0)
    dropped = torch.zeros_like(kept)
    for rank, idx in enumerate(order.tolist()):
        dropped[idx] = bool(cum[rank] <= 1 - p) and rank != len(row) - 1
    assert torch.equal(kept, ~dropped)
    assert probs[kept].sum() >= p - 1e-5 or kept.sum() == len(row)


@given(logits_rows, st.floats(0.1, 5.0))
def test_temperature_divides_logits(row, t):
    logits = torch.tensor([row])
    assert torch.allclose(sampling.temperature_scale(logits, t), logits / t)


def test_repetition_penalty_definition():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    out = sampling.repetition_penalty(logits, torch.tensor([[0, 1, 1]]), 2.0)
    assert torch.equal(out, torch.tensor([[1.0, -4.0, 1.0, 0.5]]))


def test_processors_match_transformers():
    transformers = __import__("pytest").importorskip("transformers")
    from transformers.generation import logits_process as lp

    torch.manual_seed(0)
    logits = torch.randn(4, 300)
    ids = torch.randint(0, 300, (4, 7))
    ref = lp.RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    ref = lp.TemperatureLogitsWarper(0.7)(ids, ref)
    ref = lp.TopKLogitsWarper(40)(ids, ref)
    ref = lp.TopPLogitsWarper(0.9)(ids, ref)
    ours = sampling.process(logits, ids, do_sample=True, temperature=0.7, top_k=40, top_p=0.9,
                            repetition_penalty_value=1.3)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))
    assert torch.allclose(ours[torch.isfinite(ours)], ref[torch.isfinite(ref)])


@settings(max_examples=20)
@given(st.integers(0, 2**31 - 1))
def test_sampling_is_reproducible_with_a_seeded_generator(seed):
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    a = sampling.sample(logits, torch.Generator().manual_seed(seed))
    b = sampling.sample(logits, torch.Generator().manual_seed(seed))
    assert torch.equal(a, b)


def test_sample_frequencies_follow_softmax():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sampling.sample(logits, gen) for _ in range(6000)])
    freq = torch.bincount(draws.flatten(), minlength=3).float() / draws.numel()
    assert torch.allclose(freq, logits.softmax(-1)[0], atol=0.02)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5, -2.5, 1e-30, -1e-30, 3e38, -3e38,
                                          float("inf"), float("-inf"), float("nan"), -float("nan")]),
                         min_size=1, max_size=12), min_size=1, max_size=3).filter(lambda r: len({len(x) for x in r}) == 1))
def test_ascending_order_is_torchs_stable_sort(rows):
    """Ties (+0 and -0 included) in index order, -inf first, NaN of either sign last: torch's own
    stable sort is the reference the top-p filter was written against."""
    logits = torch.tensor(rows, dtype=torch.float32)
    assert torch.equal(sampling.ascending_order(logits), torch.sort(logits, dim=-1, stable=True).indices)


def test_ascending_order_on_a_vocabulary_and_a_strided_view():
    x = torch.randn(3, 49152, generator=torch.Generator().manual_seed(0))
    x[:, 100:400] = 0.5  # a run of ties
    x[1, :50] = float("-inf")
    view = x[:, ::2]
    assert torch.equal(sampling.ascending_order(x), torch.sort(x, dim=-1, stable=True).indices)
    assert torch.equal(sampling.ascending_order(view), torch.sort(view, dim=-1, stable=True).indices)


def test_inverse_cdf_draws_follow_softmax_and_skip_masked_tokens():
    """The server's sampler against the distribution's definition: 200,000 draws over 7 tokens,
    two of them masked (-inf) and one very unlikely, each token's count within 5 standard
    deviations of n * p, and no masked token ever drawn."""
    logits = torch.tensor([[0.0, 1.0, float("-inf"), 2.0, -8.0, float("-inf"), 0.5]])
    p = logits.softmax(-1)[0].double()
    n = 200_000
    draws = sampling.sample_by_inverse_cdf(logits.expand(n, -1), torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=7).double()
    assert counts[2] == 0 and counts[5] == 0
    assert ((counts - n * p).abs() <= 5 * (n * p * (1 - p)).sqrt() + 1).all(), (counts, n * p)


def test_inverse_cdf_is_reproducible_with_a_seeded_generator():
    logits = torch.randn(5, 49152, generator=torch.Generator().manual_seed(1))
    a = sampling.sample_by_inverse_cdf(logits, torch.Generator().manual_seed(7))
    b = sampling.sample_by_inverse_cdf(logits, torch.Generator().manual_seed(7))
    c = sampling.sample_by_inverse_cdf(logits, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_inverse_cdf_at_the_top_of_the_unit_interval_draws_the_last_possible_token(monkeypatch):
    """u * total can round up to total, past every token's interval: the draw is then the last
    token with a probability, never a masked one after it (forced here with u = 1)."""
    real = torch.rand
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.ones_like(real(*a, **k)))
    logits = torch.tensor([[0.0, 3.0, 1.0, float("-inf"), float("-inf")], [1.0, 1.0, 1.0, 1.0, 1.0]])
    assert sampling.sample_by_inverse_cdf(logits).tolist() == [2, 4]


def test_inverse_cdf_at_zero_draws_the_first_possible_token(monkeypatch):
    real = torch.rand
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.zeros_like(real(*a, **k)))
    logits = torch.tensor([[float("-inf"), float("-inf"), 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    assert sampling.sample_by_inverse_cdf(logits).tolist() == [2, 0]


def test_inverse_cdf_refuses_a_row_without_a_finite_logit():
    logits = torch.tensor([[0.0, 1.0], [float("-inf"), float("-inf")]])
    with pytest.raises(GenerationError, match="no token can be sampled"):
        sampling.sample_by_inverse_cdf(logits)


@settings(max_examples=50, deadline=None)
@given(history=st.lists(st.lists(st.integers(0, 7), min_size=0, max_size=12), min_size=1, max_size=3),
       presence=st.floats(-2, 2), frequency=st.floats(-2, 2))
def test_openai_penalties_follow_openai_formula(history, presence, frequency):
    """OpenAI's documented formula, written out as a plain loop over the vocabulary:
    mu[j] -> mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence."""
    length = min(len(h) for h in history)
    rows = [h[:length] for h in history]
    logits = torch.randn(len(rows), 8)
    out = sampling.openai_penalties(logits, torch.tensor(rows, dtype=torch.long).reshape(len(rows), length),
                                    presence, frequency)
    for b, row in enumerate(rows):
        for j in range(8):
            c = row.count(j)
            expected = float(logits[b, j]) - c * frequency - float(c > 0) * presence
            assert abs(float(out[b, j]) - expected) < 1e-5


def test_logit_bias_adds_to_the_named_tokens_only():
    logits = torch.randn(2, 6)
    out = sampling.add_bias(logits, {1: 5.0, 4: -100.0})
    for b in range(2):
        for j in range(6):
            assert abs(float(out[b, j]) - (float(logits[b, j]) + {1: 5.0, 4: -100.0}.get(j, 0.0))) < 1e-5


def test_picker_applies_bias_and_penalties_to_greedy_picks():
    """A bias of +100 makes greedy pick that token; a big frequency penalty moves greedy off a repeated token."""
    from mistral_lm.generation import GenerationConfig

    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    config = GenerationConfig(do_sample=False)
    history = torch.tensor([[0, 0]])
    assert sampling.make_picker(config)(logits, history).tolist() == [0]
    assert sampling.make_picker(config, logit_bias={3: 100.0})(logits, history).tolist() == [3]
    assert sampling.make_picker(config, frequency_penalty=0.6)(logits, history).tolist() == [1]  # 3 - 2*0.6 < 2
    assert sampling.make_picker(config, presence_penalty=0.6)(logits, history).tolist() == [0]  # 3 - 0.6 > 2


def test_min_p_and_no_repeat_ngram_equal_transformers_processors():
    """The pure filters against Transformers' own MinPLogitsWarper and NoRepeatNGramLogitsProcessor."""
    transformers = pytest.importorskip("transformers")
    from mistral_lm.sampling import min_p_filter, no_repeat_ngram

    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    for min_p in (0.05, 0.3, 1.0):
        expected = transformers.MinPLogitsWarper(min_p=min_p)(None, logits.clone())
        assert torch.equal(min_p_filter(logits, min_p), expected), min_p
    ids = torch.randint(0, 6, (4, 30))  # a small alphabet: many repeated n-grams
    for n in (1, 2, 3, 5):
        expected = transformers.NoRepeatNGramLogitsProcessor(n)(ids, logits.clone())
        assert torch.equal(no_repeat_ngram(logits, ids, n), expected), n
    assert torch.equal(no_repeat_ngram(logits, ids[:, :2], 4), logits)  # too short to hold an n-gram


def test_greedy_picks_torchs_argmax():
    """greedy == torch.argmax (the first of tied maxima, a NaN before any number) on the float32
    CPU rows it takes through numpy, and on the dtypes it leaves to torch."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(6, 1000, generator=g)
    rows[1, [10, 500, 900]] = 9.0  # tied maxima
    rows[2, 700] = float("nan")
    rows[2, 800] = float("nan")
    rows[3] = float("-inf")
    rows[4, 5] = float("inf")
    rows[5, 999] = 1e30
    cases = [rows, rows[:, ::3], rows[2], rows.t().contiguous().t(), rows.bfloat16(), rows.double(),
             rows.clone().requires_grad_()]
    for case in cases:
        want = torch.argmax(case.detach(), dim=-1)
        got = sampling.greedy(case)
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
    with torch.inference_mode():
        assert torch.equal(sampling.greedy(rows), torch.argmax(rows, dim=-1))
