"""Logits processors against their definitions, on crafted logits (property tests)."""

from __future__ import annotations

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mistral_lm import sampling

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
