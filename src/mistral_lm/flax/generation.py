"""Greedy and sampled decoding for FlaxMistralForCausalLM as one jit-compiled program.

Settings arrive as a `mistral_lm.GenerationConfig` and are validated by its `validate()`, the
one definition shared with the PyTorch `generate`; `resolve_settings` only derives what the
program needs. Prefill (in chunks of at most `sliding_window` tokens, as in PyTorch) and the
whole decode loop (a `jax.lax.while_loop`) run inside a single `jax.jit`. The cache is a ring
buffer of `sliding_window` slots (or prompt + `max_new_tokens` slots without a window), so every
step has static shapes and memory does not grow with the generated length. Settings that change
the program (lengths, greedy vs sampling, eos/pad ids, min_new_tokens) are static arguments and
compile once per combination; temperature, top-k, top-p and the repetition penalty are traced
values, so trying other values reuses the compiled program.

The step-i key is `fold_in(prng_key, i)`: the same key gives the same tokens, whatever ran before.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import struct

from ..errors import GenerationError

if TYPE_CHECKING:  # generation.py imports torch; Flax code imports it only when generate runs
    from ..generation import GenerationConfig

Array = jax.Array


@struct.dataclass
class FlaxGenerateOutput:
    """`sequences` (B * num_return_sequences, T + max_new_tokens): the prompt, then new ids; pad after a row's eos."""

    sequences: Array


@dataclass(frozen=True)
class GenerationSettings:
    """The arguments of `decode`; top_k = vocab_size and top_p = 1.0 filter nothing."""

    max_new_tokens: int
    min_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    prefill_chunk_size: int


def default_config(config: Any) -> GenerationConfig:
    """The settings `generate` starts from: the old keyword defaults (20 new tokens, no top-k) and
    the model config's special tokens."""
    from ..generation import GenerationConfig

    return GenerationConfig(max_new_tokens=20, top_k=0, eos_token_id=config.eos_token_id,
                            pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id)


_TORCH_ONLY = (("num_beams", 1), ("return_dict_in_generate", False), ("output_scores", False),
               ("output_logits", False), ("stop_strings", None), ("sampler", "multinomial"))


def resolve_settings(config: Any, gen: GenerationConfig, prompt_length: int) -> GenerationSettings:
    """Validate `gen` (GenerationError naming the bad setting) and derive the program's arguments.

    max_new_tokens defaults to max_length - prompt_length, as in PyTorch; pad to the first eos,
    else 0. `use_cache` and `compile` change nothing here: the Flax program always is both.
    """
    gen.validate(config.vocab_size)
    torch_only = [f"{name}={getattr(gen, name)!r}" for name, off in _TORCH_ONLY if getattr(gen, name) != off]
    if torch_only:  # a TypeError, as for a keyword this program does not take
        raise TypeError(f"the Flax generate() does not support {', '.join(torch_only)} (beam search, output "
                        "objects with scores, stop strings and the choice of sampler are PyTorch-only); use "
                        "MistralForCausalLM.generate")
    if gen.min_p or gen.no_repeat_ngram_size:  # not traced into the Flax program: refuse, never ignore
        raise GenerationError("min_p and no_repeat_ngram_size are not supported by the Flax generate; use the "
                              "PyTorch model")
    max_new = gen.max_new_tokens if gen.max_new_tokens is not None else gen.max_length - prompt_length
    if max_new < 0:
        raise GenerationError(
            f"max_length={gen.max_length} is shorter than the prompt ({prompt_length} tokens); set max_new_tokens"
        )
    eos = tuple(gen.eos_ids)
    pad = gen.pad_token_id if gen.pad_token_id is not None else (eos[0] if eos else 0)
    window = config.sliding_window
    return GenerationSettings(
        max_new_tokens=max_new, min_new_tokens=gen.min_new_tokens, do_sample=bool(gen.do_sample),
        temperature=float(gen.temperature),
        top_k=config.vocab_size if gen.top_k == 0 else min(gen.top_k, config.vocab_size),
        top_p=float(gen.top_p), repetition_penalty=float(gen.repetition_penalty),
        eos_token_ids=eos, pad_token_id=pad,
        prefill_chunk_size=gen.prefill_chunk_size or window or prompt_length,
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


_STATIC = ("program", "max_new_tokens", "min_new_tokens", "do_sample", "eos_token_ids", "pad_token_id",
           "prefill_chunk_size")


def apply_repetition_penalty(logits: Array, seen: Array, penalty: Array | float) -> Array:
    """CTRL's penalty, as `mistral_lm.sampling.repetition_penalty`: scores of seen tokens are
    divided by `penalty` if positive, multiplied if negative. `seen` (B, V) marks the tokens of
    the prompt and of the tokens generated so far; penalty 1 changes nothing."""
    return jnp.where(seen, jnp.where(logits < 0, logits * penalty, logits / penalty), logits)


@functools.partial(jax.jit, static_argnames=_STATIC)
def decode(
    program: Any, params: Any, input_ids: Array, attention_mask: Array, prng_key: Array, *,
    max_new_tokens: int, min_new_tokens: int, do_sample: bool, temperature: Array | float, top_k: Array | int,
    top_p: Array | float, repetition_penalty: Array | float, eos_token_ids: tuple[int, ...], pad_token_id: int,
    prefill_chunk_size: int,
) -> Array:
    """Chunked prefill, then one token per while_loop step; returns the (B, T + max_new_tokens) sequences.

    `program` is the model's hashable `modeling.Program` (its linen module and `init_cache`).
    """
    b, t = input_ids.shape
    module = program.module
    variables = {"params": params}
    cache = program.init_cache(b, t + max_new_tokens)
    for start in range(0, t, prefill_chunk_size):  # unrolled: t and the chunk size are static
        end = min(start + prefill_chunk_size, t)
        out = module.apply(variables, input_ids[:, start:end], attention_mask[:, start:end], None, cache)
        cache = out.past_key_values
    step_mask = jnp.ones((b, 1), jnp.int32)
    eos = jnp.asarray(eos_token_ids, jnp.int32)
    rows = jnp.arange(b)

    def pick(logits: Array, seen: Array, step: Array) -> Array:
        logits = logits.astype(jnp.float32)
        if min_new_tokens and eos_token_ids:  # hold eos back for the first min_new_tokens steps
            logits = jnp.where(step < min_new_tokens, logits.at[:, eos].set(-jnp.inf), logits)
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
        if not do_sample:
            return jnp.argmax(logits, axis=-1)
        logits = top_p_filter(top_k_filter(logits / temperature, top_k), top_p)
        return jax.random.categorical(jax.random.fold_in(prng_key, step), logits, axis=-1)

    def cond(state: tuple) -> Array:
        step, _, _, _, _, finished = state
        return (step < max_new_tokens) & ~jnp.all(finished)

    def body(state: tuple) -> tuple:
        step, sequences, seen, logits, cache, finished = state
        token = jnp.where(finished, pad_token_id, pick(logits, seen, step)).astype(jnp.int32)  # (B,)
        sequences = jax.lax.dynamic_update_slice(sequences, token[:, None], (0, t + step))
        seen = seen.at[rows, token].set(True)
        if eos_token_ids:
            finished = finished | jnp.isin(token, eos)
        # the token of the last step is fed too: one spare forward keeps the loop body uniform
        out = module.apply(variables, token[:, None], step_mask, None, cache)
        return step + 1, sequences, seen, out.logits[:, -1], out.past_key_values, finished

    sequences = jnp.concatenate([input_ids, jnp.full((b, max_new_tokens), pad_token_id, jnp.int32)], axis=1)
    # the prompt's tokens, each row's left padding left out (as Transformers' penalty and ours do)
    lead = jnp.argmax(attention_mask != 0, axis=1)  # (B,) leading padding
    kept = (jnp.arange(t)[None, :] >= lead[:, None]).astype(jnp.int32)  # (B, T)
    seen = jnp.zeros((b, module.config.vocab_size), jnp.int32).at[rows[:, None], input_ids].max(kept) > 0  # (B, V)
    state = (jnp.zeros((), jnp.int32), sequences, seen, out.logits[:, -1], cache, jnp.zeros((b,), bool))
    return jax.lax.while_loop(cond, body, state)[1]
