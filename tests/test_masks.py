"""masks.py against brute-force loops, against transformers' sliding-window mask, and for finiteness."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mistral_lm import MistralForCausalLM
from mistral_lm.attention import eager_attention, sdpa_attention
from mistral_lm.masks import attention_mask, positions_from_padding, window_predicate

from .conftest import tiny_config

transformers = pytest.importorskip("transformers")


# ------------------------------------------------------------------ brute-force definitions
def brute_force_mask(q_pos, k_pos, k_valid, window):
    """The documented rule, one (b, q, k) at a time: a query at p sees valid keys k with p - W < k <= p;
    a query that would see nothing sees every key instead (its output is never used, but must be finite)."""
    b_size, q_len, k_len = q_pos.shape[0], q_pos.shape[1], k_pos.shape[1]
    out = torch.zeros(b_size, 1, q_len, k_len, dtype=torch.bool)
    for b in range(b_size):
        for q in range(q_len):
            p = int(q_pos[b, q])
            for k in range(k_len):
                kp = int(k_pos[b, k])
                in_window = window is None or kp > p - window
                out[b, 0, q, k] = bool(k_valid[b, k]) and kp <= p and in_window
            if not out[b, 0, q].any():
                out[b, 0, q] = True
    return out


def brute_force_positions(mask, offset):
    out = torch.zeros(mask.shape, dtype=torch.long)
    for b in range(mask.shape[0]):
        counter = offset
        for t in range(mask.shape[1]):
            if mask[b, t]:
                out[b, t] = counter
                counter += 1
    return out


@st.composite
def mask_inputs(draw):
    b, q, k = draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 10))
    # keys in any order with repeats and gaps, as a ring buffer holds them
    positions = st.integers(0, 24)
    q_pos = torch.tensor(draw(st.lists(st.lists(positions, min_size=q, max_size=q), min_size=b, max_size=b)))
    k_pos = torch.tensor(draw(st.lists(st.lists(positions, min_size=k, max_size=k), min_size=b, max_size=b)))
    k_valid = torch.tensor(draw(st.lists(st.lists(st.booleans(), min_size=k, max_size=k), min_size=b, max_size=b)))
    window = draw(st.one_of(st.none(), st.integers(1, 12)))
    return q_pos, k_pos, k_valid, window


# ------------------------------------------------------------------ ours vs brute force
@settings(max_examples=300, deadline=None)
@given(mask_inputs())
def test_attention_mask_equals_brute_force(inputs):
    q_pos, k_pos, k_valid, window = inputs
    mask = attention_mask(q_pos, k_pos, k_valid, window)
    assert mask.dtype == torch.bool
    assert torch.equal(mask, brute_force_mask(q_pos, k_pos, k_valid, window))
    assert mask.any(dim=-1).all(), "a fully masked query row gives NaN in softmax"


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 1), min_size=7, max_size=7), min_size=1, max_size=4),
    st.integers(0, 9),
)
def test_positions_from_padding_equals_brute_force(rows, offset):
    mask = torch.tensor(rows)
    assert torch.equal(positions_from_padding(mask, offset), brute_force_positions(mask, offset))
    assert torch.equal(positions_from_padding(mask.bool(), offset), brute_force_positions(mask, offset))


def test_positions_from_padding_left_padded_example():
    """The docstring's example, computed by hand: real tokens count from 0 after the padding."""
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert positions_from_padding(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


@pytest.mark.parametrize("window", [1, 2, 3, 5, 8])
def test_window_sees_exactly_w_keys_including_itself(window):
    t = 20
    pos = torch.arange(t)[None]
    mask = attention_mask(pos, pos, torch.ones(1, t, dtype=torch.bool), window)[0, 0]
    for p in range(t):
        seen = mask[p].nonzero().flatten().tolist()
        assert seen == list(range(max(0, p - window + 1), p + 1))
        assert len(seen) == min(p + 1, window)


def test_window_predicate_without_window_is_causal():
    pos = torch.arange(9)
    assert torch.equal(window_predicate(pos[:, None], pos[None, :], None), torch.ones(9, 9, dtype=torch.bool).tril())


# ------------------------------------------------------------------ ours vs transformers
def _hf_sliding_mask(window: int, padding: torch.Tensor, implementation: str) -> torch.Tensor:
    """transformers' own Mistral mask as booleans (B, 1, T, T), True where attention is allowed."""
    from transformers.masking_utils import create_sliding_window_causal_mask

    config = transformers.MistralConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                        sliding_window=window)
    config._attn_implementation = implementation
    b, t = padding.shape
    mask = create_sliding_window_causal_mask(
        config=config, inputs_embeds=torch.zeros(b, t, 64), attention_mask=padding, cache=None,
        position_ids=torch.arange(t).expand(b, t), allow_is_causal_skip=False,
    )
    return mask if mask.dtype == torch.bool else mask == 0


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("window", [1, 2, 3, 5, 16, 40])
def test_plain_sequence_mask_equals_transformers(window, implementation):
    t = 16
    padding = torch.ones(1, t, dtype=torch.long)
    ref = _hf_sliding_mask(window, padding, implementation)
    pos = torch.arange(t)[None]
    assert torch.equal(attention_mask(pos, pos, padding.bool(), window), ref)


@pytest.mark.parametrize("window", [2, 3, 6])
def test_left_padded_mask_equals_transformers_on_real_queries(window):
    """Pad queries differ on purpose (transformers leaves them empty, we open them); real rows must agree."""
    padding = torch.tensor([[1] * 10, [0] * 3 + [1] * 7, [0] * 9 + [1]])
    ref = _hf_sliding_mask(window, padding, "eager")
    pos = positions_from_padding(padding)
    ours = attention_mask(pos, pos, padding.bool(), window)
    real = padding.bool()
    assert torch.equal(ours[:, 0][real], ref[:, 0][real])
    assert not ref[:, 0][~real].any(dim=-1).any()  # the reference case our opening exists for


# ------------------------------------------------------------------ no NaN with padding
def _left_padded_batch():
    padding = torch.tensor([[1] * 8, [0] * 5 + [1] * 3, [0] * 8])  # the last row is padding only
    pos = positions_from_padding(padding)
    return padding, pos


@pytest.mark.parametrize("kernel", [eager_attention, sdpa_attention])
def test_attention_output_is_finite_for_pad_queries(kernel):
    padding, pos = _left_padded_batch()
    q, k, v = torch.randn(3, 4, 8, 16), torch.randn(3, 2, 8, 16), torch.randn(3, 2, 8, 16)
    # Without the opening, a row with no visible key is a softmax over -inf only, i.e. NaN
    # (kernels differ: some return NaN, torch's CPU SDPA returns zeros): the property can fail.
    raw = (window_predicate(pos[:, :, None], pos[:, None, :], 3) & padding.bool()[:, None, :])[:, None]
    scores = (q @ k.repeat_interleave(2, 1).transpose(2, 3)).masked_fill(~raw, float("-inf"))
    assert scores.softmax(-1).isnan().any()
    out, _ = kernel(q, k, v, attention_mask(pos, pos, padding.bool(), 3), 16**-0.5)
    assert out.isfinite().all()


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_model_logits_finite_with_fully_padded_row(implementation):
    model = MistralForCausalLM(tiny_config(sliding_window=3)).eval()
    model.attn_implementation = implementation
    padding, _ = _left_padded_batch()
    ids = torch.randint(0, model.config.vocab_size, padding.shape)
    with torch.no_grad():
        logits = model(ids, attention_mask=padding, use_cache=False).logits
        alone = model(ids[1:2, 5:], use_cache=False).logits
    assert logits.isfinite().all()
    # the padded row's real tokens are unaffected by its padding and by the empty row
    torch.testing.assert_close(logits[1, 5:], alone[0], atol=1e-5, rtol=1e-5)


def test_per_row_offset_applies_to_rows_not_columns():
    """Regression: a (B,) offset broadcast along the sequence axis when B == T."""
    mask = torch.ones(3, 3, dtype=torch.long)
    got = positions_from_padding(mask, offset=torch.tensor([0, 10, 20]))
    assert torch.equal(got, torch.tensor([[0, 1, 2], [10, 11, 12], [20, 21, 22]]))
