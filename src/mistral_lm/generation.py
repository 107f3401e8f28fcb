"""generate(): validated settings, chunked prefill, the decode step, streaming.

Every argument is checked before any tensor work, so a bad value fails in microseconds with a
message naming it rather than after a long prefill. Prompts are prefilled in chunks of at most
`sliding_window` tokens into a rolling cache of `sliding_window` slots: peak memory is O(window)
however long the prompt or the generation. The settings and output objects live in
generation_config.py, the decode step and prefill in decoding.py (re-exported here).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from . import fused_step, sampling
from .errors import GenerationError
from .decoding import _DEFAULT_CHUNK, Decoder, _recompute, compiled_layers, left_padding, prefill
from .generation_config import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput, GenerationConfig
from .streamers import TextIteratorStreamer, TextStreamer

__all__ = ["Decoder", "GenerateBeamDecoderOnlyOutput", "GenerateDecoderOnlyOutput", "GenerationConfig", "compiled_layers",
           "generate", "generate_tokens", "left_padding", "prefill"]

_COMPILED_BUCKET = 256  # a compiled decode's static cache grows in these steps


def _prompt(inputs: Any, input_ids: Any, attention_mask: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if inputs is not None and input_ids is not None:
        raise GenerationError("pass the prompt once: positionally or as input_ids")
    ids = inputs if inputs is not None else input_ids
    if isinstance(ids, Mapping):  # a BatchEncoding passed positionally
        attention_mask = ids.get("attention_mask", attention_mask)
        ids = ids["input_ids"]
    if not isinstance(ids, torch.Tensor):
        raise GenerationError(f"input_ids must be a torch tensor, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise GenerationError(f"input_ids must hold integer token ids, got {ids.dtype}")
    ids = ids[None] if ids.dim() == 1 else ids
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise GenerationError(f"input_ids must be (batch, length) with length >= 1, got {tuple(ids.shape)}")
    if attention_mask is not None:
        attention_mask = attention_mask[None] if attention_mask.dim() == 1 else attention_mask
        if attention_mask.shape != ids.shape:
            raise GenerationError(
                f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids {tuple(ids.shape)}"
            )
    return ids, attention_mask


@torch.inference_mode()
def generate(
    model: Any,
    inputs: torch.Tensor | Mapping | None = None,
    generation_config: GenerationConfig | None = None,
    *,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    streamer: Any = None,
    generator: torch.Generator | None = None,
    tokenizer: Any = None,
    **kwargs: Any,
) -> torch.Tensor | GenerateDecoderOnlyOutput | GenerateBeamDecoderOnlyOutput:
    """Continue each prompt row; returns (B * num_return_sequences, prompt + new) token ids, or
    an output object holding them (`return_dict_in_generate=True`). `tokenizer` serves `stop_strings`.

    >>> out = model.generate(**tokenizer(["Hello"], return_tensors="pt"), max_new_tokens=8)  # doctest: +SKIP
    """
    cfg = model.config
    base = generation_config or getattr(model, "generation_config", None) or GenerationConfig(
        eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id
    )
    gen = base.update(**kwargs)
    gen.validate(cfg.vocab_size)
    ids, mask = _prompt(inputs, input_ids, attention_mask)
    if int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size:
        raise GenerationError(f"input_ids hold ids outside [0, {cfg.vocab_size}) (vocab_size)")
    prompt_len = ids.shape[1]
    max_new = gen.max_new_tokens if gen.max_new_tokens is not None else gen.max_length - prompt_len
    if max_new < 0:
        raise GenerationError(
            f"max_length={gen.max_length} is shorter than the prompt ({prompt_len} tokens); set max_new_tokens"
        )
    if streamer is not None and (ids.shape[0] * gen.num_return_sequences != 1 or gen.num_beams > 1):
        raise GenerationError("streamers support batch size 1 without beam search only")
    stop = None
    if gen.stop_strings is not None:
        if tokenizer is None:  # Transformers' condition and wording (a ValueError there too)
            raise GenerationError(
                "There are one or more stop strings, either in the arguments to `generate` or in the model's "
                "generation config, but we could not locate a tokenizer. When generating with stop strings, you "
                "must pass the model's tokenizer to the `tokenizer` argument of `generate`.")
        from .stop_strings import StopStrings

        stop = StopStrings(gen.stop_list, tokenizer)

    device = model.device
    ids = ids.to(device)
    mask = torch.ones_like(ids) if mask is None else mask.to(device=device, dtype=torch.long)
    if gen.num_beams > 1:
        from .beam_search import beam_search

        beams = beam_search(model, ids, mask, gen, max_new, stop)
        return beams if gen.return_dict_in_generate else beams.sequences
    if gen.num_return_sequences > 1:
        ids = ids.repeat_interleave(gen.num_return_sequences, dim=0)
        mask = mask.repeat_interleave(gen.num_return_sequences, dim=0)
    if gen.do_sample and generator is None and gen.seed is not None:
        generator = torch.Generator(device=device).manual_seed(gen.seed)
    if streamer is not None:
        streamer.put(ids.cpu())
    out = _output_buffer(ids, gen, max_new)
    steps: list[tuple[torch.Tensor, torch.Tensor]] = []  # (logits, scores) per step, when asked for
    keep = gen.return_dict_in_generate and (gen.output_scores or gen.output_logits)
    produced = 0
    with _span(model, streamer):
        for token in generate_tokens(model, ids, mask, gen, max_new, generator, out=out, stop=stop,
                                     record=(lambda raw, scores: steps.append((raw, scores))) if keep else None):
            produced += 1
            if streamer is not None:
                streamer.put(token.cpu())
    if streamer is not None:
        streamer.end()
    sequences = out[:, : prompt_len + produced] if produced else ids
    if not gen.return_dict_in_generate:
        return sequences
    return GenerateDecoderOnlyOutput(sequences, tuple(s for _, s in steps) if gen.output_scores else None,
                                     tuple(raw for raw, _ in steps) if gen.output_logits else None)


def _span(model: Any, streamer: Any) -> contextlib.AbstractContextManager:
    """The decode loop's fused steps checked once (`fused_step.vouched`) where no code of the
    user's runs between them: no streamer, or one of ours, whose `put` only decodes text. A
    streamer of the user's may change the model between steps, which the next step must see.
    A change made from another thread while generate() runs applies from the next call."""
    if streamer is not None and type(streamer) not in (TextStreamer, TextIteratorStreamer):
        return contextlib.nullcontext()
    return fused_step.vouched_model(model)


def _pad_id(gen: GenerationConfig) -> int:
    eos = gen.eos_ids
    return gen.pad_token_id if gen.pad_token_id is not None else (eos[0] if eos else 0)


def _output_buffer(ids: torch.Tensor, gen: GenerationConfig, max_new: int) -> torch.Tensor:
    """(B, T + max_new) token ids: the prompts, then pad until tokens are written."""
    out = torch.full((ids.shape[0], ids.shape[1] + max_new), _pad_id(gen), dtype=torch.long, device=ids.device)
    out[:, : ids.shape[1]] = ids
    return out


def generate_tokens(model: Any, ids: torch.Tensor, mask: torch.Tensor, gen: GenerationConfig, max_new: int,
                    generator: torch.Generator | None = None, out: torch.Tensor | None = None,
                    stop: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    record: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
                    ) -> Iterator[torch.Tensor]:
    """Yield each step's new token per row, (B,), for up to `max_new` steps: the generator core
    of generate() and the streamers. `ids`, `mask` (B, T) are the (left-padded) prompts.

    Rows that ended (an EOS, or `stop` of the ids so far) get the pad token until every row has
    ended; as in Transformers, only when there are EOS ids (else a stopped row runs on). Prompt
    and output live in one preallocated (B, T + max_new) buffer (`out`, made here unless given),
    which the repetition penalty reads and generate() returns. `record(logits, scores)` sees
    each step's float32 logits and processed scores.
    """
    if max_new == 0:
        return
    b, prompt_len = ids.shape
    eos = gen.eos_ids
    pad = _pad_id(gen)
    history = _output_buffer(ids, gen, max_new) if out is None else out
    process = sampling.make_processor(gen)
    if gen.use_cache:
        step = Decoder(model, compile=gen.compile)
        total = prompt_len + max_new
        if gen.compile:
            total = -(-total // _COMPILED_BUCKET) * _COMPILED_BUCKET  # few distinct shapes, few compiles
        cache = model.make_cache(b, max_length=total)
        window = model.config.sliding_window
        chunk = gen.prefill_chunk_size or (window if window is not None else _DEFAULT_CHUNK)
        logits = prefill(model, cache, ids, mask, chunk)
        positions = mask.sum(dim=1)  # the next token's: real tokens so far, as masks.positions_from_padding counts
    else:
        full_mask = torch.ones_like(history)
        full_mask[:, :prompt_len] = mask
        logits = _recompute(model, history[:, :prompt_len], full_mask[:, :prompt_len])
    finished = torch.zeros(b, dtype=torch.bool, device=ids.device)
    padding = left_padding(mask)
    eos_tensor = torch.tensor(eos, device=ids.device, dtype=torch.long)
    for produced in range(max_new):
        end = prompt_len + produced
        logits = logits.float()
        scores = process(sampling.suppress(logits, eos) if produced < gen.min_new_tokens else logits,
                         history[:, :end], padding)
        if record is not None:
            record(logits, scores)
        token = sampling.choose(scores, gen.do_sample, generator, sampling.SAMPLERS[gen.sampler])
        if eos:
            token = torch.where(finished, torch.full_like(token, pad), token)
        history[:, end] = token
        yield token
        if eos:
            finished |= torch.isin(token, eos_tensor)
        if stop is not None:
            finished |= stop(history[:, : end + 1])
        if produced + 1 == max_new or bool(finished.all()):
            return
        if gen.use_cache:
            logits = step(token, positions, cache)
            positions = positions + 1
        else:
            logits = _recompute(model, history[:, : end + 1], full_mask[:, : end + 1])
