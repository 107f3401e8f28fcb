"""native/draw: the C multinomial draw == torch.multinomial(probs, 1, generator): the same tokens and
the generator left in the same state, on full, filtered, tied, unnormalised and one-entry rows, rows
drawn across the generator's refills, the rare u = 0 draws (a NaN or an infinite ratio) and the
default generator; where torch raises, the draw declines and torch's error reaches the caller."""

from __future__ import annotations

import struct

import pytest
import torch

from mistral_lm import sampling
from mistral_lm.native import draw

needs_lib = pytest.mark.skipif(draw.library() is None, reason="draw C library not built here")


def generators(seed: int, advance: int) -> tuple[torch.Generator, torch.Generator]:
    """Two generators in one state, `advance` words into their stream (so draws start anywhere
    in the 624-word state)."""
    pair = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    for g in pair:
        torch.rand(advance, generator=g)
    return pair


def assert_as_torch(probs: torch.Tensor, seed: int = 0, advance: int = 0, draws: int = 2) -> None:
    ours, theirs = generators(seed, advance)
    for _ in range(draws):
        drawn = draw.multinomial(probs, ours)
        assert drawn is not None
        assert torch.equal(drawn, torch.multinomial(probs, 1, generator=theirs)[:, 0])
        assert torch.equal(ours.get_state(), theirs.get_state())


def rows(kind: str, b: int, v: int, seed: int) -> torch.Tensor:
    logits = torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * 3
    if kind == "top-k":
        kth = logits.topk(min(50, v)).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if kind == "flat":
        logits = torch.zeros(b, v)  # every entry tied
    probs = logits.softmax(dim=-1)
    if kind == "unnormalised":
        probs = probs * 37.5
    if kind == "subnormal":
        probs = torch.full((b, v), 1e-44)
        probs[:, v // 2] = 1.0
    return probs


@needs_lib
def test_agrees_with_this_torch():
    assert draw.agrees_with_torch()


@needs_lib
@pytest.mark.parametrize("kind", ["full", "top-k", "flat", "unnormalised", "subnormal"])
@pytest.mark.parametrize("b,v", [(1, 49152), (3, 32000), (2, 313), (1, 1), (4, 7)])
def test_same_tokens_and_state_as_torch(kind, b, v):
    for seed, advance in ((0, 0), (1, 623), (2, 1001), (3, 5)):
        assert_as_torch(rows(kind, b, v, seed + v), seed, advance)


@needs_lib
def test_many_seeds_on_full_rows():
    """The bound that skips the logarithm for entries that cannot win, over many draws: any
    entry it skipped wrongly would change a token."""
    probs = rows("full", 4, 4099, 7)
    ours, theirs = generators(11, 3)
    for _ in range(200):
        assert torch.equal(draw.multinomial(probs, ours), torch.multinomial(probs, 1, generator=theirs)[:, 0])
    assert torch.equal(ours.get_state(), theirs.get_state())


@needs_lib
def test_default_generator():
    probs = rows("top-k", 2, 1000, 3)
    torch.manual_seed(5)
    drawn = draw.multinomial(probs)
    after = torch.get_rng_state()
    torch.manual_seed(5)
    assert torch.equal(drawn, torch.multinomial(probs, 1)[:, 0])
    assert torch.equal(after, torch.get_rng_state())


def crafted_state(seed: int, raw: dict[int, tuple[int, int]]) -> torch.Tensor:
    """A generator state whose next draw reads the raw (untempered) words `raw[entry]` = (high,
    low) for those entries of the row. Both 0: u = 0, so q = 0 and the ratio is p / 0 (infinite
    for p > 0, NaN for p = 0); equal words: equal ratios for equal p."""
    state = bytearray(torch.Generator().manual_seed(seed).get_state().numpy().tobytes())
    words = list(struct.unpack_from("<624Q", state, 24))
    next_word = 100
    for entry, (high, low) in raw.items():
        words[next_word + 2 * entry], words[next_word + 2 * entry + 1] = high, low
    struct.pack_into("<624Q", state, 24, *words)
    struct.pack_into("<i", state, 8, 625 - next_word)  # left
    struct.pack_into("<Q", state, 16, next_word)  # next
    return torch.frombuffer(state, dtype=torch.uint8).clone()


def assert_crafted_as_torch(probs: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    ours, theirs = torch.Generator(), torch.Generator()
    ours.set_state(state)
    theirs.set_state(state)
    expected = torch.multinomial(probs, 1, generator=theirs)[:, 0]
    assert torch.equal(draw.multinomial(probs, ours), expected)
    assert torch.equal(ours.get_state(), theirs.get_state())
    return expected


@needs_lib
@pytest.mark.parametrize("p_at_zero_draw", [0.0, 0.25])
def test_a_zero_uniform_draw_wins_as_in_torch(p_at_zero_draw):
    probs = torch.tensor([[0.25, 0.0, 0.5, 0.25, p_at_zero_draw, 0.0]])
    # torch's argmax takes the NaN (0 / 0) or the infinity (p / 0)
    assert assert_crafted_as_torch(probs, crafted_state(0, {4: (0, 0)})).item() == 4


@needs_lib
def test_tied_ratios_go_to_the_first_entry_as_in_torch():
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.1, 0.3]])
    # entries 2 and 4: equal p, equal words giving the row's smallest q
    assert assert_crafted_as_torch(probs, crafted_state(0, {2: (0, 1), 4: (0, 1)})).item() == 2


@needs_lib
@pytest.mark.parametrize("bad", ["nan", "inf", "negative", "zero row"])
def test_declines_where_torch_raises(bad):
    probs = rows("top-k", 2, 300, 1)
    probs[1, 5] = {"nan": float("nan"), "inf": float("inf"), "negative": -1e-3, "zero row": 0.0}[bad]
    if bad == "zero row":
        probs[1] = 0
    g = torch.Generator().manual_seed(0)
    before = g.get_state()
    assert draw.multinomial(probs, g) is None
    assert torch.equal(g.get_state(), before)


def test_a_row_without_a_finite_logit_raises_torchs_error():
    logits = torch.zeros(2, 10)
    logits[1] = float("-inf")
    with pytest.raises(RuntimeError, match="probability tensor"):
        sampling.sample(logits, torch.Generator().manual_seed(0))


def test_other_inputs_go_to_torch():
    probs = rows("full", 2, 100, 0)
    assert draw.multinomial(probs.double()) is None
    assert draw.multinomial(probs[0]) is None
    assert draw.multinomial(probs.t().contiguous().t()) is None  # torch draws it in memory order
    assert draw.multinomial(probs[:, :50]) is None


@needs_lib
def test_sample_draws_torchs_tokens(monkeypatch):
    """sampling.sample (generate()'s draw) through the C draw and through torch: same tokens."""
    logits = torch.randn(3, 5000, generator=torch.Generator().manual_seed(2)) * 4
    fast = [sampling.sample(logits, g) for g in [torch.Generator().manual_seed(9)] * 5]
    monkeypatch.setattr(draw, "multinomial", lambda probs, generator=None: None)
    slow = [sampling.sample(logits, g) for g in [torch.Generator().manual_seed(9)] * 5]
    assert all(torch.equal(a, b) for a, b in zip(fast, slow))


@needs_lib
def test_threads_drawing_from_one_generator_draw_what_one_thread_would():
    """Four threads drawing 50 times each from one generator advance it exactly 200 draws, as
    torch's multinomial does under its lock: no two draws read the same state."""
    import threading

    probs = rows("top-k", 1, 4000, 5)
    shared, alone = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    drawn: list[int] = []

    def worker():
        for _ in range(50):
            drawn.append(int(draw.multinomial(probs, shared)))

    workers = [threading.Thread(target=worker) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    expected = [int(torch.multinomial(probs, 1, generator=alone)) for _ in range(200)]
    assert torch.equal(shared.get_state(), alone.get_state())
    assert sorted(drawn) == sorted(expected)
