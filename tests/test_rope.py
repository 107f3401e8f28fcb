"""rope.py against transformers' rotary embedding, and the two properties that define a rotation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mistral_lm.rope import apply_rotary, cos_sin, inv_frequencies

transformers = pytest.importorskip("transformers")
from transformers.models.mistral.modeling_mistral import (  # noqa: E402
    MistralRotaryEmbedding,
    apply_rotary_pos_emb,
)

HEAD_DIMS = st.sampled_from([2, 8, 16, 24, 64, 128])
THETAS = st.one_of(st.sampled_from([10_000.0, 1e6, 500.0]), st.floats(2.0, 1e7))


def _hf_rotary(head_dim: int, theta: float):
    heads = 2
    config = transformers.MistralConfig(hidden_size=heads * head_dim, num_attention_heads=heads,
                                        num_key_value_heads=1, head_dim=head_dim, rope_theta=theta)
    return MistralRotaryEmbedding(config)


@settings(max_examples=60, deadline=None)
@given(head_dim=HEAD_DIMS, theta=THETAS, seed=st.integers(0, 2**16), max_pos=st.sampled_from([16, 4096, 131072]))
def test_apply_rotary_equals_transformers(head_dim, theta, seed, max_pos):
    gen = torch.Generator().manual_seed(seed)
    b, t = 2, 5
    positions = torch.randint(0, max_pos, (b, t), generator=gen)
    q = torch.randn(b, 4, t, head_dim, generator=gen)
    k = torch.randn(b, 2, t, head_dim, generator=gen)
    ref_cos, ref_sin = _hf_rotary(head_dim, theta)(q, positions)
    ref_q, ref_k = apply_rotary_pos_emb(q, k, ref_cos, ref_sin)
    cos, sin = cos_sin(positions, inv_frequencies(head_dim, theta))
    assert cos.dtype == sin.dtype == torch.float32
    torch.testing.assert_close(cos, ref_cos, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(sin, ref_sin, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(apply_rotary(q, cos, sin), ref_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(apply_rotary(k, cos, sin), ref_k, atol=1e-5, rtol=1e-5)


def test_tables_are_the_rounded_exact_cos_and_sin_of_their_angles():
    """Each entry is float32(cos(angle)) of its float32 angle, with the cos of Python's math in
    float64: the same in every process. Tables over 2048 entries went through torch's threaded
    float32 cos, whose worker-thread half was 1.5e-4 off in about one fresh process in ten on a
    Xeon (and never correctly rounded: off by up to one float32 step), so two runs of one greedy
    command could answer differently."""
    import math

    positions = torch.arange(0, 4096, 7)[None]  # 586 positions x 64: over 2048 entries
    inv = inv_frequencies(64, 1e6)
    cos, sin = cos_sin(positions, inv)
    angles = (positions[..., None].float() * inv).flatten().tolist()  # the float32 angles
    want_cos = torch.tensor([math.cos(a) for a in angles], dtype=torch.float64).float().view(1, -1, 32)
    want_sin = torch.tensor([math.sin(a) for a in angles], dtype=torch.float64).float().view(1, -1, 32)
    assert torch.equal(cos, torch.cat((want_cos, want_cos), -1))
    assert torch.equal(sin, torch.cat((want_sin, want_sin), -1))


@pytest.mark.parametrize("theta", [10_000.0, 1e6, 123.0])
def test_inverse_frequencies_equal_transformers(theta):
    ref = _hf_rotary(64, theta).inv_freq
    torch.testing.assert_close(inv_frequencies(64, theta), ref, atol=0, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input_is_rotated_in_float32(dtype):
    """Rotation in float32 then one rounding: equals the float32 reference rounded to x's dtype."""
    positions = torch.arange(3000, 3008)[None]
    x = torch.randn(1, 2, 8, 64).to(dtype)
    cos, sin = cos_sin(positions, inv_frequencies(64, 1e4))
    ref_cos, ref_sin = _hf_rotary(64, 1e4)(x.float(), positions)
    ref, _ = apply_rotary_pos_emb(x.float(), x.float(), ref_cos, ref_sin)
    out = apply_rotary(x, cos, sin)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref.to(dtype))


@settings(max_examples=40, deadline=None)
@given(head_dim=HEAD_DIMS, theta=THETAS, seed=st.integers(0, 2**16))
def test_rotation_preserves_norms(head_dim, theta, seed):
    gen = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, 100_000, (1, 16), generator=gen)
    x = torch.randn(1, 3, 16, head_dim, generator=gen)
    out = apply_rotary(x, *cos_sin(positions, inv_frequencies(head_dim, theta)))
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[..., 1:, :], x[..., 1:, :])  # it did rotate (positions are not all 0)


@settings(max_examples=40, deadline=None)
@given(head_dim=HEAD_DIMS, theta=THETAS, seed=st.integers(0, 2**16),
       offset=st.integers(-40, 40), starts=st.lists(st.integers(0, 2000), min_size=4, max_size=4))
def test_score_depends_only_on_relative_position(head_dim, theta, seed, offset, starts):
    """<R(p) q, R(p + d) k> is the same for every p: attention sees only the distance d."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(head_dim, generator=gen)
    k = torch.randn(head_dim, generator=gen)
    inv = inv_frequencies(head_dim, theta)
    scores = []
    for p in [max(0, -offset), *[s + max(0, -offset) for s in starts]]:
        positions = torch.tensor([[p, p + offset]])
        cos, sin = cos_sin(positions, inv)
        rotated = apply_rotary(torch.stack([q, k])[None, None], cos, sin)  # (B=1, H=1, T=2, D)
        scores.append(float(rotated[0, 0, 0] @ rotated[0, 0, 1]))
    scale = float(q.norm() * k.norm())
    for s in scores[1:]:
        assert abs(s - scores[0]) <= 2e-4 * scale  # float32 angles at positions ~2000


@settings(max_examples=40, deadline=None)
@given(head_dim=HEAD_DIMS, theta=THETAS, seed=st.integers(0, 2**16),
       max_pos=st.sampled_from([4, 300, 5000, 200_000]))
def test_step_tables_are_cos_sin_and_signed_sin_bit_for_bit(head_dim, theta, seed, max_pos):
    """The cached rows a step looks up equal what cos_sin and signed_sin compute for the same
    positions, across table growth and past the cached range."""
    from mistral_lm import rope

    gen = torch.Generator().manual_seed(seed)
    for _ in range(3):  # each call may grow the table
        positions = torch.randint(0, max_pos, (2, 3), generator=gen)
        cos, sin = cos_sin(positions, inv_frequencies(head_dim, theta))
        got_cos, got_sin = rope.step_tables(positions, head_dim, theta)
        assert torch.equal(got_cos, cos) and torch.equal(got_sin, rope.signed_sin(sin))


def test_step_tables_take_negative_and_empty_positions():
    from mistral_lm import rope

    for positions in (torch.tensor([[-3, 0, 7]]), torch.zeros(1, 0, dtype=torch.long)):
        cos, sin = cos_sin(positions, inv_frequencies(16, 1e4))
        got_cos, got_sin = rope.step_tables(positions, 16, 1e4)
        assert torch.equal(got_cos, cos) and torch.equal(got_sin, rope.signed_sin(sin))
