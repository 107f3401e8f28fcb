"""The Mistral decoder in JAX/Flax, a numerical twin of `mistral_lm.modeling`.

Notation: B batch, T new tokens this call, N cache slots, S keys attended (T without a cache,
N + T with one), H query heads, H_kv key/value heads, G = H // H_kv, D head_dim, C hidden_size.

Why flax.linen rather than nnx: the Hugging Face Flax API this twin reproduces is functional —
`model.params` is a plain pytree, `model(..., params=p)` runs any weights, and `generate` is one
`jax.jit` over (params, ids). Linen modules are exactly pure `apply(variables, ...)` functions,
so params, the KV cache and the outputs are all pytrees that cross `jit`/`while_loop` without
the graph/state splitting that nnx's stateful objects would need at every boundary.

Parameter names are Transformers' (`model/layers/0/self_attn/q_proj/kernel`), so conversion to
and from a PyTorch state dict is a rename plus a transpose of each Linear (convert.py).

Semantics shared with the PyTorch model, each one a pitfall of the historical HF Flax port:
- RoPE uses `config.rope_theta` (the old port hard-coded 10000), half-split layout.
- The sliding window is `masks.py`'s: a query at position p sees keys k with p - W < k <= p,
  W keys including itself (the old port let it see W + 1). `window_predicate` below is that
  definition in jnp and is tested against the torch one.
- Positions come from the attention mask (left padding), never from buffer order.

Float32 islands: RMSNorm statistics, RoPE angles and rotation, attention scores and softmax —
the same places, for the same reasons, as in the PyTorch model.

The KV cache (`FlaxMistralCache`) is an explicit pytree passed in and returned, with the torch
cache's semantics (cache.py): a ring buffer of W = sliding_window slots (memory constant in the
generated length), or of `max_length` slots without a window. Each slot records the absolute
position and validity of its key, so the mask comes from positions, never from slot order. A
step attends over (cached keys ∪ its new keys), then stores the last min(T, slots) new keys, so a
multi-token step never overwrites a key one of its own queries still needs.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from .._util import is_int
from ..config import MistralConfig
from ..dtypes import float_name
from ..errors import InputError
from . import convert, generation

if TYPE_CHECKING:
    from ..generation import GenerationConfig

Params = dict[str, Any]
Array = jax.Array

_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "silu": nn.silu, "swish": nn.silu, "relu": nn.relu,
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
}


# --------------------------------------------------------------------------- pure functions
def window_predicate(q_pos: Array, k_pos: Array, window: int | None) -> Array:
    """Causal (and windowed) visibility of keys at `k_pos` from queries at `q_pos` (broadcasting)."""
    visible = k_pos <= q_pos
    if window is not None:
        visible = visible & (k_pos > q_pos - window)
    return visible


def build_attention_mask(q_pos: Array, k_pos: Array, k_valid: Array, window: int | None) -> Array:
    """Boolean (B, 1, T, S), True where query t may attend key s; `masks.attention_mask` in jnp.

    A query that sees no key (a pad query left of the first real token) is opened to every key,
    so its softmax is finite; its output is never used.
    """
    mask = window_predicate(q_pos[:, :, None], k_pos[:, None, :], window) & k_valid[:, None, :]
    mask = mask | ~mask.any(axis=-1, keepdims=True)
    return mask[:, None]


def positions_from_padding(valid: Array, offset: Array | int = 0) -> Array:
    """Absolute positions (B, T): real tokens count from `offset` (tokens already cached); pads get 0.

    Example: valid [[0, 0, 1, 1, 1]], offset 0 -> [[0, 0, 0, 1, 2]].
    """
    mask = valid.astype(jnp.int32)
    positions = jnp.cumsum(mask, axis=-1) - 1 + offset
    return jnp.where(mask == 1, jnp.maximum(positions, 0), 0)


def rope_cos_sin(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """float32 cos, sin tables (B, T, D) in the half-split layout, for integer `positions` (B, T)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # (D/2,)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, T, D/2)
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # (B, T, D)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate x (B, T, heads, D) by (B, T, D) tables, in float32; returned in x's dtype."""
    cos, sin = cos[:, :, None], sin[:, :, None]  # (B, T, 1, D)
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)


# --------------------------------------------------------------------------- cache and outputs
class CacheStep(NamedTuple):
    """What one forward does with the cache, computed once and shared by every layer."""

    keep_from: int  # new tokens [keep_from:] are stored
    slots: Array  # (T - keep_from,) the slots they go to
    attend_cache: bool  # False for an empty cache: its slots hold nothing to attend


def cache_step(length: Array | int, t: int, slots: int, attend_cache: bool = True) -> CacheStep:
    """Which of T new tokens a cache of `slots` slots keeps, and where.

    Token i of the step (i >= keep_from = max(0, T - slots)) goes to slot (length + i) % slots.
    Example: 4 slots, 6 tokens stored, a step of 3 -> keep_from 0, slots [2, 3, 0].
    """
    keep_from = max(0, t - slots)
    return CacheStep(keep_from, (length + jnp.arange(keep_from, t)) % slots, attend_cache)


@struct.dataclass
class FlaxMistralCache:
    """KV cache of N slots per layer: a ring buffer of N = W = sliding_window slots, else `max_length`.

    keys/values: one (B, N, H_kv, D) buffer per layer; `positions`/`valid` (B, N): every slot's
    absolute position and whether it holds a real token; `length`: tokens stored so far (the next
    goes to slot length % N); `real_tokens` (B,): real tokens per row so far, the next one's
    default position. `max_length` (static) is how many tokens the cache accepts in all.
    """

    keys: tuple[Array, ...]
    values: tuple[Array, ...]
    positions: Array
    valid: Array
    length: Array
    real_tokens: Array
    max_length: int = struct.field(pytree_node=False)
    empty: bool = struct.field(pytree_node=False, default=False)  # from init_cache: nothing to attend yet

    @property
    def slots(self) -> int:
        return int(self.positions.shape[1])


class _Output:
    """Outputs with attribute access, `out[0]` / `out["logits"]` and tuple unpacking (None skipped)."""

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.keys())

    def __getitem__(self, key: int | str) -> Any:
        return getattr(self, key) if isinstance(key, str) else self.to_tuple()[key]

    def __iter__(self) -> Any:
        return iter(self.to_tuple())

    def keys(self) -> list[str]:
        fields = dataclasses.fields(self)  # type: ignore[arg-type]
        return [f.name for f in fields if getattr(self, f.name) is not None]


@struct.dataclass
class FlaxBaseModelOutputWithPast(_Output):
    last_hidden_state: Array
    past_key_values: FlaxMistralCache | None = None
    hidden_states: tuple[Array, ...] | None = None
    attentions: tuple[Array, ...] | None = None


@struct.dataclass
class FlaxCausalLMOutputWithPast(_Output):
    logits: Array
    past_key_values: FlaxMistralCache | None = None
    hidden_states: tuple[Array, ...] | None = None
    attentions: tuple[Array, ...] | None = None


# --------------------------------------------------------------------------- linen modules
class FlaxMistralRMSNorm(nn.Module):
    config: MistralConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        weight = self.param("weight", nn.initializers.ones, (self.config.hidden_size,), self.param_dtype)
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.config.rms_norm_eps)
        return weight.astype(self.dtype) * xf.astype(self.dtype)


def _dense(features: int, module: nn.Module, name: str) -> nn.Dense:
    init = nn.initializers.normal(module.config.initializer_range)
    return nn.Dense(features, use_bias=False, dtype=module.dtype, param_dtype=module.param_dtype,
                    kernel_init=init, name=name)


class FlaxMistralMLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x))."""

    config: MistralConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        act = _ACTIVATIONS[cfg.hidden_act]
        gate = _dense(cfg.intermediate_size, self, "gate_proj")(x)
        up = _dense(cfg.intermediate_size, self, "up_proj")(x)
        return _dense(cfg.hidden_size, self, "down_proj")(act(gate) * up)


class FlaxMistralAttention(nn.Module):
    config: MistralConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: Array, cos: Array, sin: Array, mask: Array, kv: tuple[Array, Array] | None,
        step: CacheStep | None, deterministic: bool,
    ) -> tuple[Array, tuple[Array, Array] | None, Array]:
        cfg = self.config
        h, h_kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        b, t, _ = x.shape
        q = _dense(h * d, self, "q_proj")(x).reshape(b, t, h, d)  # (B, T, H, D)
        k = _dense(h_kv * d, self, "k_proj")(x).reshape(b, t, h_kv, d)  # (B, T, H_kv, D)
        v = _dense(h_kv * d, self, "v_proj")(x).reshape(b, t, h_kv, d)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv is not None and step is not None:
            # attend over (cache ∪ new), then store: a ring slot may hold a key this step still needs
            k, v = k.astype(kv[0].dtype), v.astype(kv[1].dtype)
            cached_k, cached_v = kv
            new = slice(step.keep_from, None)
            kv = (cached_k.at[:, step.slots].set(k[:, new]), cached_v.at[:, step.slots].set(v[:, new]))
            if step.attend_cache:
                k = jnp.concatenate([cached_k, k], axis=1)  # (B, N + T, H_kv, D)
                v = jnp.concatenate([cached_v, v], axis=1)
        s = k.shape[1]
        q = q.reshape(b, t, h_kv, h // h_kv, d)  # (B, T, H_kv, G, D): query head i uses kv head i // G
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
        scores = scores.reshape(b, h, t, s) * d**-0.5  # (B, H, T, S)
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        probs = nn.Dropout(rate=cfg.attention_dropout)(probs, deterministic=deterministic)
        out = jnp.einsum("bkgts,bskd->btkgd", probs.reshape(b, h_kv, h // h_kv, t, s), v.astype(self.dtype))
        out = out.reshape(b, t, h * d)  # (B, T, H * D)
        return _dense(cfg.hidden_size, self, "o_proj")(out), kv, probs


class FlaxMistralDecoderLayer(nn.Module):
    config: MistralConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: Array, cos: Array, sin: Array, mask: Array, kv: tuple[Array, Array] | None,
        step: CacheStep | None, deterministic: bool,
    ) -> tuple[Array, tuple[Array, Array] | None, Array]:
        kw = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
        attn, kv, probs = FlaxMistralAttention(**kw, name="self_attn")(
            FlaxMistralRMSNorm(**kw, name="input_layernorm")(x), cos, sin, mask, kv, step, deterministic
        )
        x = x + attn
        x = x + FlaxMistralMLP(**kw, name="mlp")(FlaxMistralRMSNorm(**kw, name="post_attention_layernorm")(x))
        return x, kv, probs


class FlaxMistralLayerCollection(nn.Module):
    """The decoder layers, named "0", "1", ... under "layers" as in the PyTorch state dict."""

    config: MistralConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: Array, cos: Array, sin: Array, mask: Array, cache: FlaxMistralCache | None,
        step: CacheStep | None, deterministic: bool, output_attentions: bool, output_hidden_states: bool,
    ) -> tuple[Array, list[tuple[Array, Array]], list[Array], list[Array]]:
        new_kv: list[tuple[Array, Array]] = []
        hidden: list[Array] = []
        attentions: list[Array] = []
        for i in range(self.config.num_hidden_layers):
            if output_hidden_states:
                hidden.append(x)
            kv = None if cache is None else (cache.keys[i], cache.values[i])
            layer = FlaxMistralDecoderLayer(self.config, self.dtype, self.param_dtype, name=str(i))
            x, kv, probs = layer(x, cos, sin, mask, kv, step, deterministic)
            if kv is not None:
                new_kv.append(kv)
            if output_attentions:
                attentions.append(probs)
        return x, new_kv, hidden, attentions


class FlaxMistralModule(nn.Module):
    """Embeddings, decoder layers, final norm: the linen body of FlaxMistralModel."""

    config: MistralConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        self.embed_tokens = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
            embedding_init=nn.initializers.normal(cfg.initializer_range),
        )
        self.layers = FlaxMistralLayerCollection(cfg, self.dtype, self.param_dtype)
        self.norm = FlaxMistralRMSNorm(cfg, self.dtype, self.param_dtype)

    def __call__(
        self, input_ids: Array, attention_mask: Array, position_ids: Array | None = None,
        cache: FlaxMistralCache | None = None, deterministic: bool = True,
        output_attentions: bool = False, output_hidden_states: bool = False,
    ) -> FlaxBaseModelOutputWithPast:
        """`attention_mask` (B, T) marks the new tokens only; cached validity lives in `cache`."""
        cfg = self.config
        valid = attention_mask.astype(bool)
        t = input_ids.shape[1]
        if position_ids is None:
            offset = 0 if cache is None else cache.real_tokens[:, None]  # (B, 1) real tokens cached
            position_ids = positions_from_padding(valid, offset)
        position_ids = position_ids.astype(jnp.int32)
        step = None if cache is None else cache_step(cache.length, t, cache.slots, attend_cache=not cache.empty)
        if step is None or not step.attend_cache:
            k_pos, k_valid = position_ids, valid
        else:  # the keys attended: every cache slot, then the new tokens (B, N + T)
            k_pos = jnp.concatenate([cache.positions, position_ids], axis=1)
            k_valid = jnp.concatenate([cache.valid, valid], axis=1)
        mask = build_attention_mask(position_ids, k_pos, k_valid, cfg.sliding_window)
        cos, sin = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta)
        h, new_kv, hidden, attentions = self.layers(
            self.embed_tokens(input_ids), cos, sin, mask, cache, step, deterministic, output_attentions,
            output_hidden_states,
        )
        h = self.norm(h)
        if output_hidden_states:
            hidden.append(h)  # Transformers' convention: the last entry is after the final norm
        if cache is not None and step is not None:
            new = slice(step.keep_from, None)
            cache = FlaxMistralCache(
                keys=tuple(k for k, _ in new_kv), values=tuple(v for _, v in new_kv),
                positions=cache.positions.at[:, step.slots].set(position_ids[:, new]),
                valid=cache.valid.at[:, step.slots].set(valid[:, new]), length=cache.length + t,
                real_tokens=cache.real_tokens + valid.sum(axis=-1, dtype=jnp.int32), max_length=cache.max_length,
            )
        return FlaxBaseModelOutputWithPast(
            last_hidden_state=h, past_key_values=cache,
            hidden_states=tuple(hidden) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )

    def attend(self, h: Array) -> Array:
        """Logits from the input embedding matrix (tied head): h @ embedding.T."""
        return self.embed_tokens.attend(h)


class FlaxMistralForCausalLMModule(nn.Module):
    config: MistralConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        self.model = FlaxMistralModule(self.config, self.dtype, self.param_dtype)
        if not self.config.tie_word_embeddings:
            self.lm_head = _dense(self.config.vocab_size, self, "lm_head")

    def __call__(
        self, input_ids: Array, attention_mask: Array, position_ids: Array | None = None,
        cache: FlaxMistralCache | None = None, deterministic: bool = True,
        output_attentions: bool = False, output_hidden_states: bool = False,
    ) -> FlaxCausalLMOutputWithPast:
        out = self.model(input_ids, attention_mask, position_ids, cache, deterministic, output_attentions,
                         output_hidden_states)
        h = out.last_hidden_state
        logits = self.model.attend(h) if self.config.tie_word_embeddings else self.lm_head(h)
        return FlaxCausalLMOutputWithPast(logits, out.past_key_values, out.hidden_states, out.attentions)


# --------------------------------------------------------------------------- user-facing models
@dataclasses.dataclass(frozen=True)
class Program:
    """A linen module as a hashable static `jax.jit` argument.

    Equality is the `key` (module class, dtypes, config JSON), so models built separately from
    equal configs share compiled programs instead of compiling once per instance. It holds the
    module only (config and dtypes), never params: jit caches keep static arguments alive.
    """

    key: str
    module: nn.Module = dataclasses.field(compare=False)

    def init_cache(self, batch_size: int, max_length: int) -> FlaxMistralCache:
        cfg, dtype = self.module.config, self.module.dtype
        window = cfg.sliding_window
        slots = max_length if window is None else min(window, max_length)  # a ring of W slots
        shape = (batch_size, slots, cfg.num_key_value_heads, cfg.head_dim)  # (B, N, H_kv, D)
        return FlaxMistralCache(
            keys=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_hidden_layers)),
            values=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_hidden_layers)),
            positions=jnp.zeros((batch_size, slots), jnp.int32),
            valid=jnp.zeros((batch_size, slots), bool),
            length=jnp.zeros((), jnp.int32),
            real_tokens=jnp.zeros((batch_size,), jnp.int32),
            max_length=max_length,
            empty=True,
        )


@functools.partial(jax.jit, static_argnames=("program", "train", "output_attentions", "output_hidden_states"))
def _forward(
    program: Program, params: Params, input_ids: Array, attention_mask: Array, position_ids: Array | None,
    cache: FlaxMistralCache | None, rngs: dict[str, Array], *, train: bool, output_attentions: bool,
    output_hidden_states: bool,
) -> Any:
    return program.module.apply({"params": params}, input_ids, attention_mask, position_ids, cache, not train,
                                output_attentions, output_hidden_states, rngs=rngs)


class FlaxMistralPreTrainedModel:
    """Holds config, linen module and params; HF Flax's call signature, loading and saving.

    >>> from mistral_lm import MistralConfig, FlaxMistralForCausalLM
    >>> cfg = MistralConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                     num_attention_heads=4, num_key_value_heads=2)
    >>> FlaxMistralForCausalLM(cfg)([[1, 2, 3]]).logits.shape
    (1, 3, 100)
    """

    module_class: type[nn.Module]  # set by each model class
    architecture: str  # its PyTorch class name, written to config.json

    def __init__(
        self, config: MistralConfig, input_shape: tuple[int, int] = (1, 1), seed: int = 0,
        dtype: Any = jnp.float32, _do_init: bool = True, *, param_dtype: Any = jnp.float32,
    ) -> None:
        self.config = config
        self.dtype = _float_dtype(dtype, "dtype")
        self.param_dtype = _float_dtype(param_dtype, "param_dtype")
        self.module = self.module_class(config, self.dtype, self.param_dtype)
        self._program = Program(
            f"{type(self.module).__name__}|{self.dtype}|{self.param_dtype}|{config.to_json_string()}", self.module
        )
        self._params: Params | None = self.init_weights(jax.random.PRNGKey(seed), input_shape) if _do_init else None

    # ------------------------------------------------------------------ params
    def _dummy_inputs(self, input_shape: tuple[int, int]) -> tuple[Array, Array]:
        ids = jnp.zeros(input_shape, jnp.int32)
        return ids, jnp.ones_like(ids)

    def init_weights(self, rng: Array, input_shape: tuple[int, int]) -> Params:
        """Random params (normal(initializer_range) matrices, unit norms), as the PyTorch model."""
        return jax.jit(self.module.init)(rng, *self._dummy_inputs(input_shape))["params"]

    @property
    def params_shape_tree(self) -> Params:
        """The params pytree as jax.ShapeDtypeStruct leaves, computed without allocating."""
        return jax.eval_shape(self.module.init, jax.random.PRNGKey(0), *self._dummy_inputs((1, 1)))["params"]

    @property
    def params(self) -> Params:
        if self._params is None:
            raise InputError("this model was built with _do_init=False: pass params= or set model.params")
        return self._params

    @params.setter
    def params(self, params: Params) -> None:
        self._params = params

    def init_cache(self, batch_size: int, max_length: int) -> FlaxMistralCache:
        """An empty cache for `max_length` tokens (prompt + every token to be generated), model dtype.

        With a sliding window it holds min(W, max_length) slots whatever `max_length` is.
        """
        if not is_int(max_length) or not is_int(batch_size) or max_length < 1 or batch_size < 1:
            raise InputError(f"batch_size and max_length must be positive integers, got {batch_size!r}, {max_length!r}")
        return self._program.init_cache(batch_size, max_length)

    # ------------------------------------------------------------------ forward
    def __call__(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        position_ids: Any = None,
        params: Params | None = None,
        past_key_values: FlaxMistralCache | None = None,
        dropout_rng: Array | None = None,
        train: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> Any:
        """Forward pass; returns an output dataclass, or its tuple when `return_dict=False`.

        `attention_mask` is (B, T) or, with a cache, (B, cached + T) as in PyTorch; only its last
        T columns are read, the cache remembers the rest. Without `position_ids`, positions count
        the real tokens of each row (left padding). A cache from `init_cache` is returned updated
        in `past_key_values`.
        """
        cfg = self.config
        ids = self._check_input_ids(input_ids)
        b, t = ids.shape
        past = 0 if past_key_values is None else _concrete_int(past_key_values.length)
        if past_key_values is not None and past is not None and past + t > past_key_values.max_length:
            raise InputError(
                f"the cache has taken {past} of the {past_key_values.max_length} tokens it was made for; {t} more "
                f"do not fit: call init_cache with max_length >= {past + t}"
            )
        mask = np.ones((b, t), np.int32) if attention_mask is None else _int32(attention_mask)
        mask = mask[None] if mask.ndim == 1 else mask
        if mask.ndim != 2 or mask.shape[0] != b or mask.shape[1] < t:
            raise InputError(f"attention_mask must be (batch={b}, [cached +] {t}), got {tuple(mask.shape)}")
        if position_ids is not None:
            position_ids = _int32(position_ids)
            xp = jnp if isinstance(position_ids, jax.core.Tracer) else np
            position_ids = xp.broadcast_to(position_ids, (b, t))
        if train and cfg.attention_dropout > 0 and dropout_rng is None:
            raise InputError("train=True with attention_dropout > 0 needs a dropout_rng")
        attentions = cfg.output_attentions if output_attentions is None else output_attentions
        hidden = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        rngs = {} if dropout_rng is None else {"dropout": dropout_rng}
        out = _forward(
            self._program, self.params if params is None else params, ids, mask[:, -t:], position_ids,
            past_key_values, rngs, train=train, output_attentions=bool(attentions), output_hidden_states=bool(hidden),
        )
        return out if (cfg.return_dict if return_dict is None else return_dict) else out.to_tuple()

    def _check_input_ids(self, input_ids: Any) -> Any:
        traced = isinstance(input_ids, jax.core.Tracer)
        ids = input_ids if traced else np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"input_ids must be integers of shape (batch, seq>=1), got {ids.dtype}{ids.shape}")
        if not traced:
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.config.vocab_size:
                bad = lo if lo < 0 else hi
                raise InputError(f"token id {bad} is out of range for vocab_size {self.config.vocab_size}")
        return _int32(ids)

    # ------------------------------------------------------------------ files
    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, dtype: Any = jnp.float32, *,
        param_dtype: Any = jnp.float32, config: MistralConfig | None = None,
    ) -> FlaxMistralPreTrainedModel:
        """Load a local Transformers folder (config.json + safetensors, single or sharded).

        `dtype` is the computation dtype; params are cast to `param_dtype` (float32 by default,
        whatever the checkpoint stores). A causal-LM checkpoint loads into FlaxMistralModel (its
        lm_head is skipped) and a base-model one under FlaxMistralForCausalLM if embeddings are tied.
        """
        config = config or MistralConfig.from_pretrained(pretrained_model_name_or_path)
        model = cls(config, dtype=dtype, _do_init=False, param_dtype=param_dtype)
        tensors = convert.load_safetensors(pretrained_model_name_or_path)
        model.params = convert.hf_to_flax(tensors, model.params_shape_tree, source=str(pretrained_model_name_or_path))
        return model

    def save_pretrained(self, save_directory: str | os.PathLike, params: Params | None = None) -> None:
        """Write config.json and model.safetensors in the Transformers (PyTorch) layout."""
        params = self.params if params is None else params
        config = MistralConfig.from_dict(self.config.to_dict())
        config.architectures = [self.architecture]
        config.torch_dtype = jnp.dtype(jax.tree_util.tree_leaves(params)[0].dtype).name
        config.save_pretrained(save_directory)
        convert.save_safetensors(convert.flax_to_hf(params), save_directory)


class FlaxMistralModel(FlaxMistralPreTrainedModel):
    """The bare decoder: returns `last_hidden_state` (B, T, C)."""

    module_class = FlaxMistralModule
    architecture = "MistralModel"


class FlaxMistralForCausalLM(FlaxMistralPreTrainedModel):
    """Decoder + language-model head: returns `logits` (B, T, V); `generate` decodes under jit."""

    module_class = FlaxMistralForCausalLMModule
    architecture = "MistralForCausalLM"

    def generate(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        generation_config: GenerationConfig | None = None,
        *,
        prng_key: Array | None = None,
        params: Params | None = None,
        **kwargs: Any,
    ) -> generation.FlaxGenerateOutput:
        """Greedy (`do_sample=False`) or sampled continuation of a (left-padded) batch, under jit.

        Settings are a `GenerationConfig` (validated by its `validate()`, as in PyTorch) updated
        by keyword arguments of the same names; an unknown keyword is a TypeError. Without one,
        generation starts from 20 new tokens, no top-k, and the model config's eos/pad ids;
        `top_k=None` / `top_p=None` mean no filter, `eos_token_id=None` / `pad_token_id=None` the
        config's. The repetition penalty applies first, then (when sampling) temperature, top-k
        and top-p; draws use `prng_key` (default PRNGKey(seed or 0)). Rows that emit an eos id
        are padded with the pad id after it; the loop stops early once every row has finished.

        >>> out = model.generate(ids, attention_mask=mask, max_new_tokens=8)  # doctest: +SKIP
        >>> out.sequences.shape  # (B, T + 8)  # doctest: +SKIP
        """
        ids = self._check_input_ids(input_ids)
        mask = np.ones(ids.shape, np.int32) if attention_mask is None else _int32(attention_mask)
        mask = mask[None] if mask.ndim == 1 else mask
        if mask.shape != ids.shape:
            raise InputError(f"attention_mask must have the shape of input_ids {ids.shape}, got {mask.shape}")
        for name, off in (("top_k", 0), ("top_p", 1.0)):  # the keyword API's "None: no filter"
            if name in kwargs and kwargs[name] is None:
                kwargs[name] = off
        for name in ("eos_token_id", "pad_token_id"):  # None: the model config's
            if name in kwargs and kwargs[name] is None:
                del kwargs[name]
        gen = (generation_config or generation.default_config(self.config)).update(**kwargs)
        settings = generation.resolve_settings(self.config, gen, ids.shape[1])
        if gen.num_return_sequences > 1:
            n = gen.num_return_sequences
            ids, mask = jnp.repeat(ids, n, axis=0), jnp.repeat(mask, n, axis=0)  # (B * n, T)
        if settings.max_new_tokens == 0:
            return generation.FlaxGenerateOutput(sequences=jnp.asarray(ids))
        key = jax.random.PRNGKey(gen.seed or 0) if prng_key is None else prng_key
        sequences = generation.decode(self._program, self.params if params is None else params, ids, mask, key,
                                      **vars(settings))
        return generation.FlaxGenerateOutput(sequences=sequences)


def _float_dtype(dtype: Any, name: str) -> jnp.dtype:
    """The torch side's name table (dtypes.py), mapped to jax's dtype."""
    try:
        spelled = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
    except TypeError:
        spelled = repr(dtype)  # not a dtype at all: float_name names it in its error
    return jnp.dtype(float_name(spelled, name))


def _int32(x: Any) -> Any:
    """x as int32, as a host (numpy) array unless traced: checks and slices then compile nothing."""
    return x.astype(jnp.int32) if isinstance(x, jax.core.Tracer) else np.asarray(x).astype(np.int32)


def _concrete_int(x: Array) -> int | None:
    """The value of a scalar, or None inside a trace (where the check moves to the caller)."""
    return None if isinstance(x, jax.core.Tracer) else int(x)
