"""Greedy and sampled decoding for FlaxMistralForCausalLM as one jit-compiled program.

Prefill and the whole decode loop (a `jax.lax.while_loop`) run inside a single `jax.jit`, with a
fixed-size cache of prompt + `max_new_tokens` slots, so every step has static shapes. Settings
that change the program (lengths, greedy vs sampling, eos/pad ids) are static arguments and
compile once per combination; temperature, top-k and top-p are traced values, so trying other
values reuses the compiled program.

The step-i key is `fold_in(prng_key, i)`: the same key gives the same tokens, whatever ran before.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from ..errors import GenerationError

Array = jax.Array


@struct.dataclass
class FlaxGenerateOutput:
    """`sequences` (B, T + max_new_tokens): the prompt, then new ids; pad after a row's eos."""

    sequences: Array


@dataclass(frozen=True)
class GenerationSettings:
    """Validated arguments of `decode`; top_k = vocab_size and top_p = 1.0 filter nothing."""

    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    eos_token_ids: tuple[int, ...]
    pad_token_id: int


def resolve_settings(
    config: Any, *, max_new_tokens: int, do_sample: bool, temperature: float, top_k: int | None,
    top_p: float | None, eos_token_id: int | list[int] | None, pad_token_id: int | None,
) -> GenerationSettings:
    """Validate the arguments (GenerationError naming the bad one) and fill defaults from the config.

    eos defaults to `config.eos_token_id`; pad to `config.pad_token_id`, else the first eos, else 0.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise GenerationError(f"temperature must be > 0, got {temperature!r}; use do_sample=False for greedy")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise GenerationError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise GenerationError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    eos = config.eos_token_id if eos_token_id is None else eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
    pad = pad_token_id if pad_token_id is not None else config.pad_token_id
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    for name, ids in (("eos_token_id", eos_ids), ("pad_token_id", (pad,))):
        if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < config.vocab_size for i in ids):
            raise GenerationError(f"{name} must be token ids in [0, {config.vocab_size}), got {ids}")
    return GenerationSettings(
        max_new_tokens=max_new_tokens, do_sample=bool(do_sample), temperature=float(temperature),
        top_k=config.vocab_size if top_k is None else min(top_k, config.vocab_size),
        top_p=1.0 if top_p is None else float(top_p),
        eos_token_ids=tuple(int(i) for i in eos_ids), pad_token_id=int(pad),
    )


def top_k_filter(logits: Array, k: Array | int) -> Array:
    """Keep the k largest logits of each row (ties with the k-th kept too); the rest become -inf.

    `k` may be traced (1 <= k <= V); k = V keeps everything.
    """
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]  # (B, V), descending
    kth = jnp.take_along_axis(sorted_logits, jnp.full(logits.shape[:-1] + (1,), k - 1), axis=-1)  # (B, 1)
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: Array, p: Array | float) -> Array:
    """Keep the most likely tokens until their mass reaches p (nucleus); the rest become -inf.

    A token is kept when the mass of the tokens strictly more likely than it is below p, so the
    most likely token is always kept. Example: probs (0.5, 0.3, 0.2), p=0.7 -> keep the first two.
    `p` may be traced; p = 1 keeps everything (a rounded cumulative sum could otherwise drop a
    token of negligible mass).
    """
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]  # (B, V), descending
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.sum(mass_before < p, axis=-1, keepdims=True)  # (B, 1), >= 1
    cutoff = jnp.take_along_axis(sorted_logits, kept - 1, axis=-1)
    return jnp.where((logits < cutoff) & (p < 1), -jnp.inf, logits)


_STATIC = ("program", "max_new_tokens", "do_sample", "eos_token_ids", "pad_token_id")


@functools.partial(jax.jit, static_argnames=_STATIC)
def decode(
    program: Any, params: Any, input_ids: Array, attention_mask: Array, prng_key: Array, *,
    max_new_tokens: int, do_sample: bool, temperature: Array | float, top_k: Array | int, top_p: Array | float,
    eos_token_ids: tuple[int, ...], pad_token_id: int,
) -> Array:
    """Prefill, then one token per while_loop step; returns the (B, T + max_new_tokens) sequences.

    `program` is the model's hashable `modeling.Program` (its linen module and `init_cache`).
    """
    b, t = input_ids.shape
    module = program.module
    variables = {"params": params}
    out = module.apply(variables, input_ids, attention_mask, None, program.init_cache(b, t + max_new_tokens))
    step_mask = jnp.ones((b, 1), jnp.int32)
    eos = jnp.asarray(eos_token_ids, jnp.int32)

    def pick(logits: Array, step: Array) -> Array:
        logits = logits.astype(jnp.float32)
        if not do_sample:
            return jnp.argmax(logits, axis=-1)
        logits = top_p_filter(top_k_filter(logits / temperature, top_k), top_p)
        return jax.random.categorical(jax.random.fold_in(prng_key, step), logits, axis=-1)

    def cond(state: tuple) -> Array:
        step, _, _, _, finished = state
        return (step < max_new_tokens) & ~jnp.all(finished)

    def body(state: tuple) -> tuple:
        step, sequences, logits, cache, finished = state
        token = jnp.where(finished, pad_token_id, pick(logits, step)).astype(jnp.int32)  # (B,)
        sequences = jax.lax.dynamic_update_slice(sequences, token[:, None], (0, t + step))
        if eos_token_ids:
            finished = finished | jnp.isin(token, eos)
        # the token of the last step is fed too: one spare forward keeps the loop body uniform
        out = module.apply(variables, token[:, None], step_mask, None, cache)
        return step + 1, sequences, out.logits[:, -1], out.past_key_values, finished

    sequences = jnp.concatenate([input_ids, jnp.full((b, max_new_tokens), pad_token_id, jnp.int32)], axis=1)
    state = (jnp.zeros((), jnp.int32), sequences, out.logits[:, -1], out.past_key_values, jnp.zeros((b,), bool))
    return jax.lax.while_loop(cond, body, state)[1]
