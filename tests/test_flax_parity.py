"""The Flax twin vs our PyTorch model (and one cross-check each against transformers).

Weights travel through save_pretrained folders in both directions, so every parity test also
exercises the converters. Torch weights are randomized (norm gains included) so that a swapped
or untransposed tensor cannot hide behind a symmetric initialization.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from mistral_lm import GenerationConfig, MistralForCausalLM, MistralModel, masks
from mistral_lm.errors import CheckpointError, GenerationError, InputError

from .conftest import PARITY_CONFIGS, tiny_config

jax = pytest.importorskip("jax")
pytest.importorskip("flax")
import jax.numpy as jnp  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from mistral_lm.flax import FlaxMistralForCausalLM, FlaxMistralModel  # noqa: E402
from mistral_lm.flax.generation import apply_repetition_penalty, top_k_filter, top_p_filter  # noqa: E402
from mistral_lm.flax.modeling import build_attention_mask, positions_from_padding  # noqa: E402

# one worker runs them all (make test's --dist loadgroup): tests that decode the same shapes reuse
# one compiled program, which costs seconds to compile in each worker
pytestmark = pytest.mark.xdist_group("flax")

TOL = 1e-4  # float32 parity bound asked of the twin


def _randomize(model: torch.nn.Module) -> None:
    """Scale-0.15 matrices and norm gains 1 + N(0, 0.1): logits spread enough to rank tokens."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))


def _config(name: str, **overrides):
    return tiny_config(**{**PARITY_CONFIGS[name], **overrides})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """name -> folder of a randomized torch MistralForCausalLM (one per parity config), built once."""

    folders: dict[str, Path] = {}

    def make(name: str, **overrides) -> Path:
        key = name + json.dumps(overrides, sort_keys=True)
        if key not in folders:
            torch.manual_seed(zlib.crc32(key.encode()))  # the same weights whichever test asks first
            model = MistralForCausalLM(_config(name, **overrides)).eval()
            _randomize(model)
            folders[key] = tmp_path_factory.mktemp(name)
            model.save_pretrained(folders[key])
        return folders[key]

    return make


def _batch(vocab: int, length: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """3 rows; rows 1 and 2 left-padded by 5 and 11 tokens."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (3, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :11] = 0
    return ids, mask


def _diff(a, b, where=None) -> float:
    d = np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))
    return float((d if where is None else d[where]).max())


# --------------------------------------------------------------------------- the mask definition
@pytest.mark.parametrize("window", [None, 1, 3, 6])
def test_mask_twin_equals_masks_py(window):
    g = torch.Generator().manual_seed(window or 0)
    q_pos = torch.randint(0, 20, (2, 7), generator=g)
    k_pos = torch.randint(0, 20, (2, 15), generator=g)
    k_valid = torch.rand(2, 15, generator=g) > 0.3
    ours = build_attention_mask(jnp.asarray(q_pos.numpy()), jnp.asarray(k_pos.numpy()), jnp.asarray(k_valid.numpy()),
                                window)
    ref = masks.attention_mask(q_pos, k_pos, k_valid, window)
    np.testing.assert_array_equal(np.asarray(ours), ref.numpy())
    valid = torch.rand(2, 9, generator=g) > 0.4
    for offset in (0, 4):
        np.testing.assert_array_equal(np.asarray(positions_from_padding(jnp.asarray(valid.numpy()), offset)),
                                      masks.positions_from_padding(valid, offset).numpy())


def test_window_attends_exactly_w_keys(checkpoint):
    model = FlaxMistralForCausalLM.from_pretrained(checkpoint("window"))
    window = model.config.sliding_window
    ids, _ = _batch(model.config.vocab_size)
    probs = model(ids[:1].numpy(), output_attentions=True).attentions[0][0]  # (H, T, T)
    seen = np.asarray(probs > 0).sum(-1)  # keys with weight, per head and query
    expected = np.minimum(np.arange(ids.shape[1]) + 1, window)
    assert (seen == expected).all()


# --------------------------------------------------------------------------- forward parity
@pytest.mark.parametrize("name", sorted(PARITY_CONFIGS))
def test_forward_matches_torch(name, checkpoint):
    folder = checkpoint(name)
    ref = MistralForCausalLM.from_pretrained(folder).eval()
    model = FlaxMistralForCausalLM.from_pretrained(folder)
    ids, mask = _batch(ref.config.vocab_size)
    with torch.no_grad():
        a = ref(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True, use_cache=False)
    b = model(ids.numpy(), attention_mask=mask.numpy(), output_hidden_states=True, output_attentions=True)
    real = mask.bool().numpy()
    assert _diff(a.logits, b.logits, real) <= TOL
    assert len(b.hidden_states) == len(a.hidden_states) == ref.config.num_hidden_layers + 1
    for x, y in zip(a.hidden_states, b.hidden_states, strict=True):
        assert _diff(x, y, real) <= TOL
    assert len(b.attentions) == ref.config.num_hidden_layers
    for x, y in zip(a.attentions, b.attentions, strict=True):  # (B, H, T, T): rows of real queries
        assert _diff(x.permute(0, 2, 1, 3), np.asarray(y).transpose(0, 2, 1, 3), real) <= TOL


def test_forward_matches_transformers(checkpoint):
    transformers = pytest.importorskip("transformers")
    folder = checkpoint("window")
    ref = transformers.MistralForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model = FlaxMistralForCausalLM.from_pretrained(folder)
    ids, mask = _batch(model.config.vocab_size)
    positions = masks.positions_from_padding(mask)  # transformers' forward takes them explicitly
    with torch.no_grad():
        a = ref(ids, attention_mask=mask, position_ids=positions, output_hidden_states=True)
    b = model(ids.numpy(), attention_mask=mask.numpy(), output_hidden_states=True)
    real = mask.bool().numpy()
    assert _diff(a.logits, b.logits, real) <= TOL
    for x, y in zip(a.hidden_states, b.hidden_states, strict=True):
        assert _diff(x, y, real) <= TOL


def test_base_model_matches_torch(checkpoint, tmp_path):
    folder = checkpoint("head_dim")
    ref = MistralModel.from_pretrained(folder).eval()
    model = FlaxMistralModel.from_pretrained(folder)  # a causal-LM folder: its lm_head is skipped
    ids, mask = _batch(ref.config.vocab_size)
    with torch.no_grad():
        a = ref(ids, attention_mask=mask, use_cache=False)
    b = model(ids.numpy(), attention_mask=mask.numpy())
    assert _diff(a.last_hidden_state, b.last_hidden_state, mask.bool().numpy()) <= TOL
    ref.save_pretrained(tmp_path)  # a bare-decoder folder: no lm_head
    np.testing.assert_array_equal(FlaxMistralModel.from_pretrained(tmp_path)(ids.numpy()).last_hidden_state,
                                  model(ids.numpy()).last_hidden_state)
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        FlaxMistralForCausalLM.from_pretrained(tmp_path)


def test_left_padded_rows_equal_rows_alone(checkpoint):
    model = FlaxMistralForCausalLM.from_pretrained(checkpoint("window"))
    ids, mask = _batch(model.config.vocab_size)
    batch = np.asarray(model(ids.numpy(), attention_mask=mask.numpy()).logits)
    for row in (1, 2):  # the padded rows
        real = mask[row].bool().numpy()
        alone = model(ids[row, real][None].numpy()).logits[0]
        assert _diff(batch[row, real], alone) <= TOL


# --------------------------------------------------------------------------- cache
def test_cached_decoding_equals_full_forward(checkpoint):
    model = FlaxMistralForCausalLM.from_pretrained(checkpoint("window"))  # GQA, window 5 << 28 tokens
    ids, mask = _batch(model.config.vocab_size)
    full = np.asarray(model(ids.numpy(), attention_mask=mask.numpy()).logits)
    cache = model.init_cache(ids.shape[0], ids.shape[1])
    pieces = []
    # prefill 12 (row 2: 11 pads, 1 real token), a chunk of 4, then one token at a time
    bounds = [0, 12, 16, *range(17, ids.shape[1] + 1)]
    for start, end in zip(bounds, bounds[1:]):
        # the mask covers cached + new tokens, as in PyTorch; new-only works too (odd steps)
        m = mask[:, :end] if start % 2 == 0 else mask[:, start:end]
        out = model(ids[:, start:end].numpy(), attention_mask=m.numpy(), past_key_values=cache)
        cache = out.past_key_values
        pieces.append(np.asarray(out.logits))
    assert int(cache.length) == ids.shape[1]
    assert _diff(full, np.concatenate(pieces, axis=1), mask.bool().numpy()) <= TOL
    with pytest.raises(InputError, match="init_cache"):
        model(ids[:, :1].numpy(), past_key_values=cache)


# --------------------------------------------------------------------------- generation
def test_ring_cache_holds_window_slots(checkpoint):
    """With a window, the cache is W slots whatever the length: decoding 3W tokens one at a time
    keeps every array's shape and still equals the full forward."""
    model = FlaxMistralForCausalLM.from_pretrained(checkpoint("window"))
    w = model.config.sliding_window
    def shapes(cache) -> list[tuple[int, ...]]:
        return [np.shape(leaf) for leaf in jax.tree_util.tree_leaves(cache)]

    assert shapes(model.init_cache(2, w)) == shapes(model.init_cache(2, 4 * w)) == shapes(model.init_cache(2, 1000))
    assert model.init_cache(2, 1000).keys[0].shape == (2, w, model.config.num_key_value_heads, model.config.head_dim)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 3 * w))
    cache = model.init_cache(2, 3 * w)
    first = shapes(cache)
    pieces = []
    for i in range(3 * w):
        out = model(ids[:, i:i + 1], past_key_values=cache)
        cache = out.past_key_values
        assert shapes(cache) == first
        pieces.append(np.asarray(out.logits))
    assert _diff(model(ids).logits, np.concatenate(pieces, axis=1)) <= TOL


# ("window", 14, 16 new tokens) is test_generate_takes_a_generation_config's first comparison
@pytest.mark.parametrize("name, length, options", [
    ("tied", 14, {}),
    # prompt + new tokens many times the window: the ring buffer wraps during prefill and decode
    ("window", 20, dict(max_new_tokens=24)),
    ("head_dim", 20, dict(max_new_tokens=24, prefill_chunk_size=3)),
    ("gqa", 20, dict(max_new_tokens=24)),
    ("gqa", 14, dict(repetition_penalty=1.3)),
])
def test_greedy_generate_matches_torch(name, length, options, checkpoint):
    folder = checkpoint(name, eos_token_id=None, pad_token_id=0)
    ref = MistralForCausalLM.from_pretrained(folder).eval()
    model = FlaxMistralForCausalLM.from_pretrained(folder)
    ids, mask = _batch(model.config.vocab_size, length=length)
    options = {"max_new_tokens": 16, **options}
    expected = ref.generate(ids, attention_mask=mask, do_sample=False, **options)
    out = model.generate(ids.numpy(), attention_mask=mask.numpy(), **options)
    assert out.sequences.shape == (3, length + options["max_new_tokens"])
    np.testing.assert_array_equal(np.asarray(out.sequences), expected.numpy())
    if "repetition_penalty" in options:  # the penalty changed something
        plain = model.generate(ids.numpy(), attention_mask=mask.numpy(), max_new_tokens=options["max_new_tokens"])
        assert (np.asarray(plain.sequences) != np.asarray(out.sequences)).any()


def test_repetition_penalty_matches_sampling_py():
    from mistral_lm import sampling

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 40)).astype(np.float32) * 3
    ids = rng.integers(0, 40, (3, 9))
    seen = np.zeros((3, 40), bool)
    np.put_along_axis(seen, ids, True, axis=1)
    for penalty in (0.7, 1.0, 1.3):
        ours = apply_repetition_penalty(jnp.asarray(logits), jnp.asarray(seen), penalty)
        ref = sampling.repetition_penalty(torch.from_numpy(logits), torch.from_numpy(ids), penalty)
        np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=1e-6)


def test_greedy_generate_matches_transformers(checkpoint):
    transformers = pytest.importorskip("transformers")
    folder = checkpoint("window", eos_token_id=None, pad_token_id=0)
    ref = transformers.MistralForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model = FlaxMistralForCausalLM.from_pretrained(folder)
    ids, mask = _batch(model.config.vocab_size, length=14)
    with torch.no_grad():
        expected = ref.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    out = model.generate(ids.numpy(), attention_mask=mask.numpy(), max_new_tokens=16)
    np.testing.assert_array_equal(np.asarray(out.sequences), expected.numpy())


def test_generate_pads_after_eos(checkpoint):
    model = FlaxMistralForCausalLM.from_pretrained(checkpoint("window", eos_token_id=None, pad_token_id=0))
    ids, mask = _batch(model.config.vocab_size, length=14)
    free = np.asarray(model.generate(ids.numpy(), attention_mask=mask.numpy(), max_new_tokens=16).sequences)
    eos = int(free[0, 14 + 3])  # row 0's fourth new token becomes the eos id
    out = np.asarray(model.generate(ids.numpy(), attention_mask=mask.numpy(), max_new_tokens=16,
                                    eos_token_id=eos, pad_token_id=1).sequences)
    for row in range(3):
        new = list(free[row, 14:])
        stop = new.index(eos) + 1 if eos in new else len(new)
        np.testing.assert_array_equal(out[row, 14:], new[:stop] + [1] * (len(new) - stop))


def test_sampling_is_reproducible_and_filtered(checkpoint):
    model = FlaxMistralForCausalLM.from_pretrained(checkpoint("window", eos_token_id=None, pad_token_id=0))
    ids, mask = _batch(model.config.vocab_size, length=14)
    args = dict(attention_mask=mask.numpy(), max_new_tokens=16, do_sample=True, temperature=1.5)
    first = np.asarray(model.generate(ids.numpy(), prng_key=jax.random.PRNGKey(7), **args).sequences)
    again = np.asarray(model.generate(ids.numpy(), prng_key=jax.random.PRNGKey(7), **args).sequences)
    other = np.asarray(model.generate(ids.numpy(), prng_key=jax.random.PRNGKey(8), **args).sequences)
    np.testing.assert_array_equal(first, again)
    assert (first != other).any()
    greedy = np.asarray(model.generate(ids.numpy(), attention_mask=mask.numpy(), max_new_tokens=16).sequences)
    for narrow in (dict(top_k=1), dict(top_p=1e-6)):  # one candidate left: sampling is greedy
        sampled = model.generate(ids.numpy(), prng_key=jax.random.PRNGKey(7), **args, **narrow).sequences
        np.testing.assert_array_equal(np.asarray(sampled), greedy)


def test_filters_match_brute_force():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 50)).astype(np.float32) * 2
    for k in (1, 7, 50):
        kept = np.isfinite(np.asarray(top_k_filter(jnp.asarray(logits), k)))
        for row in range(4):
            assert set(np.flatnonzero(kept[row])) == set(np.argsort(-logits[row])[:k])
    assert np.isfinite(np.asarray(top_p_filter(jnp.asarray(logits), 1.0))).all()
    for p in (0.1, 0.5, 0.9):
        kept = np.isfinite(np.asarray(top_p_filter(jnp.asarray(logits), p)))
        for row in range(4):
            probs = np.exp(logits[row] - logits[row].max())
            probs /= probs.sum()
            order = np.argsort(-probs)
            n = int(np.searchsorted(np.cumsum(probs[order]), p) + 1)  # smallest prefix with mass >= p
            assert set(np.flatnonzero(kept[row])) == set(order[:n])


def test_generate_rejects_bad_arguments(checkpoint):
    model = FlaxMistralForCausalLM.from_pretrained(checkpoint("gqa"))
    # GenerationConfig.validate() judges, as for PyTorch: max_new_tokens=0 and top_k=0 (off) are valid there
    for bad in (dict(max_new_tokens=-1), dict(do_sample=True, temperature=0.0), dict(top_k=-1),
                dict(top_p=1.5), dict(eos_token_id=10**6), dict(repetition_penalty=0.0),
                dict(generation_config=GenerationConfig(max_new_tokens=None, max_length=2))):
        with pytest.raises(GenerationError):
            model.generate(np.array([[1, 2, 3]]), **bad)
    with pytest.raises(TypeError, match="num_beams"):
        model.generate(np.array([[1, 2, 3]]), num_beams=2)
    with pytest.raises(TypeError, match="sampler"):  # JAX draws its own way: refused, not ignored
        model.generate(np.array([[1, 2, 3]]), do_sample=True, sampler="inverse_cdf")
    np.testing.assert_array_equal(model.generate(np.array([[1, 2, 3]]), max_new_tokens=0).sequences, [[1, 2, 3]])


def test_generate_takes_a_generation_config(checkpoint):
    folder = checkpoint("window", eos_token_id=None, pad_token_id=0)
    ref = MistralForCausalLM.from_pretrained(folder).eval()
    model = FlaxMistralForCausalLM.from_pretrained(folder)
    ids, mask = _batch(model.config.vocab_size, length=14)
    gen = GenerationConfig(max_new_tokens=16, min_new_tokens=4, eos_token_id=None, pad_token_id=0)
    expected = ref.generate(ids, attention_mask=mask, generation_config=gen)
    out = model.generate(ids.numpy(), mask.numpy(), gen)
    np.testing.assert_array_equal(np.asarray(out.sequences), expected.numpy())
    keyword = model.generate(ids.numpy(), attention_mask=mask.numpy(), max_new_tokens=16)
    np.testing.assert_array_equal(np.asarray(out.sequences), np.asarray(keyword.sequences))
    sampled = model.generate(ids.numpy(), mask.numpy(), GenerationConfig(max_new_tokens=4, do_sample=True, seed=3,
                                                                         num_return_sequences=2))
    assert sampled.sequences.shape == (6, 18)


# --------------------------------------------------------------------------- dtypes and modes
@pytest.mark.parametrize("dtype, bits", [("bfloat16", 8), ("float16", 11)])
def test_half_precision_runs_close(dtype, bits, checkpoint):
    folder = checkpoint("gqa")
    full = FlaxMistralForCausalLM.from_pretrained(folder)
    half = FlaxMistralForCausalLM.from_pretrained(folder, dtype=dtype)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(half.params))
    ids, _ = _batch(full.config.vocab_size)
    a = np.asarray(full(ids.numpy()).logits)
    b = half(ids.numpy()).logits
    assert b.dtype == jnp.dtype(dtype)
    # a few dozen roundings of relative size 2**-bits pile up through two layers: allow 32 of them
    assert _diff(a, b) <= 32 * 2.0**-bits * np.abs(a).max()
    stored = FlaxMistralForCausalLM.from_pretrained(folder, dtype=dtype, param_dtype=dtype)
    assert all(p.dtype == jnp.dtype(dtype) for p in jax.tree_util.tree_leaves(stored.params))
    assert _diff(a, stored(ids.numpy()).logits) <= 32 * 2.0**-bits * np.abs(a).max()


def test_dropout_only_in_train_mode(checkpoint):
    model = FlaxMistralForCausalLM.from_pretrained(checkpoint("gqa", attention_dropout=0.5))
    ids = np.arange(1, 20)[None]
    rng = jax.random.PRNGKey(3)
    eval_logits = np.asarray(model(ids).logits)
    train = np.asarray(model(ids, train=True, dropout_rng=rng).logits)
    assert _diff(eval_logits, train) > 1e-3
    np.testing.assert_array_equal(train, model(ids, train=True, dropout_rng=rng).logits)
    with pytest.raises(InputError, match="dropout_rng"):
        model(ids, train=True)


def test_outputs_index_like_tuples(checkpoint):
    model = FlaxMistralForCausalLM.from_pretrained(checkpoint("gqa"))
    ids = np.array([[5, 6, 7, 8]])
    out = model(ids, past_key_values=model.init_cache(1, 8))
    logits, cache = out  # None fields (hidden states, attentions) are skipped
    assert out[0] is out.logits is out["logits"] is logits and cache is out.past_key_values
    plain = model(ids, return_dict=False)
    assert isinstance(plain, tuple) and len(plain) == 1
    np.testing.assert_array_equal(plain[0], model(ids).logits)
    assert _diff(plain[0], out.logits) <= TOL  # with and without a cache: other XLA fusions, same numbers
    with pytest.raises(InputError, match="vocab_size"):
        model(np.array([[model.config.vocab_size]]))
    bare = FlaxMistralForCausalLM(model.config, _do_init=False)
    with pytest.raises(InputError, match="_do_init=False"):
        bare(ids)
    np.testing.assert_array_equal(bare(ids, params=model.params).logits, plain[0])


# --------------------------------------------------------------------------- files
@pytest.mark.parametrize("name", ["gqa", "tied"])
def test_save_pretrained_loads_in_torch_and_transformers(name, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = FlaxMistralForCausalLM(_config(name), seed=5)
    model.save_pretrained(tmp_path)
    ids, mask = _batch(model.config.vocab_size)
    expected = np.asarray(model(ids.numpy(), attention_mask=mask.numpy()).logits)
    real = mask.bool().numpy()
    for cls in (MistralForCausalLM, transformers.MistralForCausalLM):
        torch_model = cls.from_pretrained(tmp_path).eval()
        with torch.no_grad():
            logits = torch_model(ids, attention_mask=mask, position_ids=masks.positions_from_padding(mask)).logits
        assert _diff(logits, expected, real) <= TOL
    reloaded = FlaxMistralForCausalLM.from_pretrained(tmp_path)
    jax.tree_util.tree_map(np.testing.assert_array_equal, reloaded.params, model.params)


def test_sharded_bfloat16_checkpoint_loads(checkpoint, tmp_path):
    folder = checkpoint("gqa")
    half = MistralForCausalLM.from_pretrained(folder, torch_dtype=torch.bfloat16)
    half.save_pretrained(tmp_path, max_shard_size="30KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    single = FlaxMistralForCausalLM.from_pretrained(folder)
    sharded = FlaxMistralForCausalLM.from_pretrained(tmp_path)  # params float32 unless asked
    rounded = jax.tree_util.tree_map(lambda p: p.astype(jnp.bfloat16).astype(jnp.float32), single.params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, sharded.params, rounded)


def test_checkpoint_errors_name_the_tensor(checkpoint, tmp_path):
    state = load_file(checkpoint("gqa") / "model.safetensors")
    shutil.copy(checkpoint("gqa") / "config.json", tmp_path)
    key = "model.layers.1.self_attn.k_proj.weight"
    broken = {
        "missing": {k: v for k, v in state.items() if k != key},
        "unexpected": {**state, "model.layers.9.mlp.up_proj.weight": state[key].clone()},
        "mis-shaped": {**state, key: state[key][:, :-1].contiguous()},
    }
    for problem, tensors in broken.items():
        save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(CheckpointError) as info:
            FlaxMistralForCausalLM.from_pretrained(tmp_path)
        message = str(info.value)
        assert problem in message
        assert ("layers.9.mlp.up_proj" if problem == "unexpected" else key) in message
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        FlaxMistralForCausalLM.from_pretrained(tmp_path)
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors only"):
        FlaxMistralForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("target", ["../elsewhere.safetensors", "sub/../../elsewhere.safetensors", "absolute"])
def test_index_pointing_outside_the_folder_is_refused(checkpoint, tmp_path, target):
    """The Flax loader shares the shard-index guard of the PyTorch one (hf_folder)."""
    half = MistralForCausalLM.from_pretrained(checkpoint("gqa"))
    half.save_pretrained(tmp_path / "m", max_shard_size="30KB")
    folder = tmp_path / "m"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first = sorted(folder.glob("model-*.safetensors"))[0]
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(first.read_bytes())  # a valid file: only its location is wrong
    target = str(outside) if target == "absolute" else target
    index["weight_map"] = {k: (target if v == first.name else v) for k, v in index["weight_map"].items()}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="points outside its folder"):
        FlaxMistralForCausalLM.from_pretrained(folder)


# --------------------------------------------------------------------------- the seed's example
def test_seed_flax_example_runs(tokenizer_model_v1, tmp_path):
    """The HF doc's FlaxMistralForCausalLM example, with the import changed and local folders."""
    torch.manual_seed(0)
    ref = MistralForCausalLM(tiny_config(vocab_size=32000, sliding_window=4)).eval()
    _randomize(ref)
    ref.save_pretrained(tmp_path)
    shutil.copy(tokenizer_model_v1, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    from mistral_lm import AutoTokenizer
    path = str(tmp_path)

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = FlaxMistralForCausalLM.from_pretrained(path)
    inputs = tokenizer("Hello, my dog is cute", return_tensors="np")
    outputs = model(**inputs)
    logits = outputs.logits

    ids = torch.as_tensor(np.asarray(inputs["input_ids"]))
    assert logits.shape == (1, ids.shape[1], 32000)
    with torch.no_grad():
        assert _diff(ref(ids).logits, logits) <= TOL


def test_importing_mistral_lm_does_not_import_jax():
    torch_only = ("import sys, mistral_lm; mistral_lm.MistralConfig; mistral_lm.MistralForCausalLM; "
                  "assert not {'jax', 'flax'} & set(sys.modules), 'jax imported'")
    jax_only = "import sys, mistral_lm.flax; assert 'torch' not in sys.modules, 'torch imported'"
    for code in (torch_only, jax_only):
        subprocess.run([sys.executable, "-c", code], check=True)


def test_flax_refuses_settings_it_does_not_trace():
    """min_p and no_repeat_ngram_size run in the PyTorch picker only: Flax refuses them, never ignores."""
    from mistral_lm.flax.generation import resolve_settings

    config = tiny_config()
    for bad in ({"min_p": 0.1, "do_sample": True}, {"no_repeat_ngram_size": 2}):
        with pytest.raises(GenerationError, match="not supported by the Flax generate"):
            resolve_settings(config, GenerationConfig(max_new_tokens=4, **bad), 3)
