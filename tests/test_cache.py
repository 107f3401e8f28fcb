"""Rolling-cache invariants: incremental == full recompute with the window mask, chunked == unchunked."""

from __future__ import annotations

import pytest
import torch

from mistral_lm import MistralForCausalLM
from mistral_lm.cache import KVCache

from .conftest import tiny_config


def _model(**overrides) -> MistralForCausalLM:
    return MistralForCausalLM(tiny_config(**overrides)).eval()


@torch.no_grad()
def test_rolling_decode_matches_full_forward_every_step():
    """W=8, 110 tokens decoded one by one: every step within 1e-4 of a no-cache forward."""
    model = _model(sliding_window=8)
    ids = torch.randint(0, 128, (2, 110))
    full = model(ids, use_cache=False).logits
    cache = model.model.make_cache(2)
    assert cache.rolling and cache.size == 8
    worst = 0.0
    for t in range(ids.shape[1]):
        step = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits[:, 0]
        worst = max(worst, (step - full[:, t]).abs().max().item())
    assert worst <= 1e-4


@torch.no_grad()
def test_cache_bytes_constant_after_window():
    model = _model(sliding_window=8)
    cache = model.model.make_cache(1)
    sizes = []
    for t in range(40):
        model(torch.tensor([[t % 128]]), past_key_values=cache, use_cache=True)
        sizes.append(cache.nbytes())
    assert len(set(sizes)) == 1
    per_layer = 2 * 1 * 2 * 8 * 16 * 4  # k and v: (B=1, H_kv=2, W=8, D=16) float32
    assert sizes[0] >= model.config.num_hidden_layers * per_layer


@pytest.mark.parametrize("chunk", [1, 3, 8, 13, 40])
@torch.no_grad()
def test_chunked_prefill_equals_unchunked(chunk):
    model = _model(sliding_window=8)
    ids = torch.randint(0, 128, (2, 37))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    full = model(ids, attention_mask=mask, use_cache=False).logits
    cache = model.model.make_cache(2)
    outs = []
    for start in range(0, ids.shape[1], chunk):
        end = min(start + chunk, ids.shape[1])
        outs.append(model(ids[:, start:end], attention_mask=mask[:, :end], past_key_values=cache).logits)
    got = torch.cat(outs, dim=1)
    assert (got - full)[mask.bool()].abs().max() <= 1e-4


@torch.no_grad()
def test_multi_token_step_does_not_overwrite_keys_still_needed():
    """A chunk on a full ring buffer must attend before it stores (W=4: chunk 4-5 over slots of 0-1)."""
    model = _model(sliding_window=4)
    ids = torch.randint(0, 128, (1, 6))
    full = model(ids, use_cache=False).logits
    cache = model.model.make_cache(1)
    model(ids[:, :4], past_key_values=cache)
    got = model(ids[:, 4:], past_key_values=cache).logits
    assert (got - full[:, 4:]).abs().max() <= 1e-5


@torch.no_grad()
def test_static_cache_grows_for_manual_loops_without_window():
    model = _model(sliding_window=None)
    ids = torch.randint(0, 128, (1, 300))
    full = model(ids, use_cache=False).logits
    out = model(ids[:, :10])  # use_cache defaults to True at inference: a cache comes back
    cache = out.past_key_values
    assert isinstance(cache, KVCache) and not cache.rolling
    for t in range(10, 300):
        step = model(ids[:, t : t + 1], past_key_values=cache).logits
        assert (step[:, 0] - full[:, t]).abs().max() <= 1e-4
    assert cache.get_seq_length() == 300 and cache.size >= 300


@torch.no_grad()
def test_manual_loop_with_growing_attention_mask_matches_batch_rows_alone():
    """The seed's manual loop: past_key_values from forward, attention_mask growing by one each step."""
    model = _model(sliding_window=6)
    prompts = [torch.randint(0, 128, (n,)) for n in (9, 4)]
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, -len(p):] = p
        mask[row, -len(p):] = 1
    out = model(ids, attention_mask=mask)
    cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1)
    tokens = [nxt]
    for _ in range(12):
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        out = model(nxt[:, None], attention_mask=mask, past_key_values=cache)
        nxt = out.logits[:, -1].argmax(-1)
        tokens.append(nxt)
    batched = torch.stack(tokens, dim=1)
    for row, p in enumerate(prompts):
        alone = model.generate(p[None], max_new_tokens=13, eos_token_id=None)[0, len(p):]
        assert torch.equal(alone, batched[row])


def test_foreign_cache_object_is_rejected():
    model = _model(sliding_window=6)
    with pytest.raises(ValueError, match="past_key_values"):
        model(torch.tensor([[1, 2]]), past_key_values=((torch.zeros(1), torch.zeros(1)),))


def test_cache_batch_mismatch_is_a_clear_error():
    model = _model(sliding_window=6)
    cache = model.model.make_cache(2)
    with pytest.raises(ValueError, match="batch size 2"):
        model(torch.tensor([[1, 2]]), past_key_values=cache)


# ------------------------------------------------------------------ the step is a transaction
def _state(cache: KVCache) -> dict:
    return {"seen": cache.seen, "positions": cache.positions.clone(), "valid": cache.valid.clone(),
            "keys": [k.clone() for k in cache.keys], "values": [v.clone() for v in cache.values]}


class _Interrupt(Exception):
    pass


def _interrupt(*args):
    raise _Interrupt("the step died in layer 1")


@pytest.mark.parametrize(
    "window,prefix,new,size",
    [
        (None, 5, 3, None),  # static, multi-token step
        (None, 5, 1, None),  # static, one token
        (None, 5, 3, 5),  # static buffer that the step must grow
        (4, 0, 3, None),  # rolling, first chunk into an empty buffer
        (4, 6, 3, None),  # rolling, chunk on a full buffer (read then write)
        (4, 6, 1, None),  # rolling, one token over the oldest slot (write then read)
    ],
)
@torch.no_grad()
def test_interrupted_step_leaves_the_cache_holding_what_it_held(window, prefix, new, size):
    """A forward that dies between layers must not leave a cache that claims keys it does not
    hold: positions, validity and the token count are as before, every key a later query can see
    is intact, and running the step again gives the logits of a full forward."""
    model = _model(sliding_window=window)
    ids = torch.randint(0, 128, (2, prefix + new))
    cache = model.model.make_cache(2, max_length=size)
    if prefix:
        model(ids[:, :prefix], past_key_values=cache)
    before = _state(cache)
    handle = model.model.layers[1].register_forward_pre_hook(_interrupt)
    with pytest.raises(_Interrupt):
        model(ids[:, prefix:], past_key_values=cache)
    handle.remove()
    after = _state(cache)
    assert after["seen"] == before["seen"] == prefix
    assert torch.equal(after["positions"], before["positions"]) and torch.equal(after["valid"], before["valid"])
    # a key a later query (position >= prefix) can see: valid, and inside the window of position `prefix`
    visible = before["valid"] & (before["positions"] > prefix - (window or 10**9))
    for name in ("keys", "values"):
        for b_t, a_t in zip(before[name], after[name]):
            slots = b_t.shape[2]
            assert torch.equal(a_t[:, :, :slots].transpose(1, 2)[visible], b_t.transpose(1, 2)[visible])
    got = model(ids[:, prefix:], past_key_values=cache).logits
    full = model(ids, use_cache=False).logits[:, prefix:]
    assert (got - full).abs().max() <= 1e-4
    assert cache.get_seq_length() == prefix + new


def test_plan_changes_nothing_until_commit():
    cache = _model(sliding_window=4).model.make_cache(1)
    positions, valid = torch.arange(3)[None], torch.ones(1, 3, dtype=torch.bool)
    before = _state(cache)
    plan = cache.plan(positions, valid)
    plan_again = cache.plan(positions, valid)
    assert cache.seen == 0 and torch.equal(cache.positions, before["positions"])
    assert torch.equal(plan.key_positions, plan_again.key_positions) and plan.seen == 3


# ------------------------------------------------------------------ rows moved between caches
def _reference(model, seq: list[int]) -> torch.Tensor:
    """Next-token logits of `seq` alone, without any cache: the independent reference."""
    return model(torch.tensor([seq]), use_cache=False).logits[0, -1]


@pytest.mark.parametrize("window", [6, None])
@torch.no_grad()
def test_rows_moved_into_a_batch_cache_decode_as_they_do_alone(window):
    """Rows prefilled alone (some left-padded) join a batch cache between decode steps, are
    copied, reordered and dropped; every row's logits at every step equal that row's own."""
    from mistral_lm.generation import Decoder

    model = _model(sliding_window=window)
    decode = Decoder(model)
    g = torch.Generator().manual_seed(1)
    seqs = {name: torch.randint(0, 128, (40,), generator=g).tolist() for name in "abc"}
    batch = model.make_cache(0)
    rows: list[list] = []  # [name, tokens of it already in the cache]

    def join(name: str, prompt: int, copies: int = 1, pad: int = 0) -> None:
        ids = torch.tensor([[0] * pad + seqs[name][:prompt]])
        mask = torch.tensor([[0] * pad + [1] * prompt])
        source = model.make_cache(1, max_length=ids.shape[1])
        model(ids, attention_mask=mask, past_key_values=source)
        batch.append_rows([(source, prompt, copies)])
        rows.extend([name, prompt] for _ in range(copies))

    def step(times: int) -> None:
        for _ in range(times):
            tokens = torch.tensor([seqs[name][n] for name, n in rows])
            positions = torch.tensor([n for _, n in rows])
            logits = decode(tokens, positions, batch)
            for row, (name, n) in enumerate(rows):
                want = _reference(model, seqs[name][: n + 1])
                assert (logits[row] - want).abs().max() <= 1e-4, (name, n)
                rows[row][1] += 1

    join("a", 9)
    join("b", 3, pad=4)
    step(3)
    join("c", 5, copies=2)
    step(4)
    batch.select_rows([3, 0, 2])  # drop b and one copy of c, reorder
    rows[:] = [rows[3], rows[0], rows[2]]
    step(3)
    join("b", 7, pad=2)
    step(5)
    batch.select_rows([])
    rows.clear()
    assert batch.batch_size == 0
    join("c", 2)
    step(2)


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("attn", ["native", "sdpa", "eager"])
@torch.no_grad()
def test_a_16_bit_cache_is_the_float32_model_with_keys_and_values_rounded(attn, cache_dtype, monkeypatch):
    """kv_cache_dtype float16 or bfloat16 on a float32 model: every logit, prefill and decode
    steps, equals what the float32 cache gives when `update` is handed keys and values rounded
    by torch (the reference: the same rounding, no narrower storage)."""
    model = _model(sliding_window=None)
    model.attn_implementation = attn
    ids = torch.randint(0, 128, (2, 40))

    def run() -> torch.Tensor:
        cache = model.make_cache(2, 64)
        logits = [model(ids[:, :33], past_key_values=cache).logits]
        logits += [model(ids[:, t:t + 1], past_key_values=cache).logits for t in range(33, 40)]
        return torch.cat(logits, 1)

    model.kv_cache_dtype = cache_dtype
    assert model.make_cache(1).keys[0].dtype == cache_dtype
    narrow = run()
    model.kv_cache_dtype = None
    assert model.make_cache(1).keys[0].dtype == torch.float32
    update = KVCache.update
    monkeypatch.setattr(KVCache, "update", lambda self, layer, k, v, plan: update(
        self, layer, k.to(cache_dtype).float(), v.to(cache_dtype).float(), plan))
    rounded = run()
    assert torch.equal(narrow, rounded)
    monkeypatch.setattr(KVCache, "update", update)
    assert not torch.equal(narrow, run())  # the rounding is seen: the test can fail


def test_kv_cache_dtype_defaults_and_checks(tmp_path):
    """float16 for a GGUF model on the native kernels (llama.cpp's default); a float model's own
    dtype otherwise, so its logits stay Transformers'; names and dtypes are taken,
    anything else refused by name."""
    from mistral_lm.errors import ConfigError
    from mistral_lm.loading import kv_cache_dtype_for

    from .conftest import default_model_or_skip

    _model().save_pretrained(tmp_path)
    assert MistralForCausalLM.from_pretrained(tmp_path).make_cache(1).keys[0].dtype == torch.float32
    assert MistralForCausalLM.from_pretrained(tmp_path, kv_cache_dtype="bfloat16").kv_cache_dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="kv_cache_dtype"):
        MistralForCausalLM.from_pretrained(tmp_path, kv_cache_dtype="int8")
    with pytest.raises(ConfigError, match="kv_cache_dtype"):
        _model().kv_cache_dtype = torch.int8
    assert kv_cache_dtype_for(None, True, torch.float32) == torch.float16  # the native kernels' float32 model
    assert kv_cache_dtype_for(None, True, torch.bfloat16) is None  # torch's int4 path: already 16 bits, not twice
    assert kv_cache_dtype_for("bfloat16", True, torch.float32) == torch.bfloat16
    path = default_model_or_skip()
    native = MistralForCausalLM.from_pretrained(path, gguf_native=True)
    assert native.kv_cache_dtype == torch.float16 and native.make_cache(1).values[-1].dtype == torch.float16
    kept = MistralForCausalLM.from_pretrained(path, gguf_native=True, kv_cache_dtype=torch.float32)
    assert kept.make_cache(1).keys[0].dtype == torch.float32


# ------------------------------------------------------------------ every layer holds the bookkeeping's slots
from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_OPS = st.lists(st.one_of(
    st.tuples(st.just("step"), st.integers(1, 6), st.integers(0, 3)),  # T new tokens, layers reached (3: all)
    st.tuples(st.just("select"), st.integers(0, 2), st.integers(0, 0)),
    st.tuples(st.just("append"), st.integers(1, 7), st.integers(1, 2)),
    st.tuples(st.just("reorder"), st.integers(0, 0), st.integers(0, 0)),
    st.tuples(st.just("copy"), st.integers(0, 0), st.integers(0, 0))), max_size=12)


@settings(max_examples=60, deadline=None)
@given(ops=_OPS, size=st.integers(1, 6))
@example(ops=[("step", 2, 1), ("append", 1, 1)], size=1)  # regression: rows joined after a cut-short growing step
def test_every_layer_holds_the_slots_its_bookkeeping_names(ops, size):
    """The property a step relies on to skip growing the layers one by one (`_reserve_all`):
    after any steps (whole, or cut short after some layers), row moves and copies, every
    layer's key and value buffers hold at least `cache.size` slots. (Rows once failed to join a
    cache whose last step, cut short, had grown only some of its layers.)"""
    layers, heads, dim = 3, 2, 4
    cache = KVCache(layers, 2, heads, dim, size, rolling=False, dtype=torch.float32, device="cpu")
    for op, a, b in ops:
        if op == "step" and cache.batch_size:
            rows = cache.batch_size
            positions = (cache.seen + torch.arange(a)).expand(rows, a)
            plan = cache.plan(positions, torch.ones(rows, a, dtype=torch.bool))
            for layer in range(min(b, layers) if b < 3 else layers):
                kv = torch.randn(rows, heads, a, dim)
                cache.update(layer, kv, kv, plan)
            if b == 3:
                cache.commit(plan)
        elif op == "select":
            cache.select_rows(list(range(min(a, cache.batch_size))))
        elif op == "append":
            source = KVCache(layers, 1, heads, dim, a, rolling=False, dtype=torch.float32, device="cpu")
            plan = source.plan(torch.arange(a)[None], torch.ones(1, a, dtype=torch.bool))
            for layer in range(layers):
                kv = torch.randn(1, heads, a, dim)
                source.update(layer, kv, kv, plan)
            source.commit(plan)
            cache.append_rows([(source, a, b)])
        elif op == "reorder" and cache.batch_size:
            cache.reorder_cache(torch.arange(cache.batch_size).flip(0))
        elif op == "copy":
            cache = cache.copy()
        assert all(t.shape[2] >= cache.size for t in (*cache.keys, *cache.values)), op
