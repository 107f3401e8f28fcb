"""generate(): validated settings, chunked prefill, the decode step, streaming.

Every argument is checked before any tensor work, so a bad value fails in microseconds with a
message naming it rather than after a long prefill. Prompts are prefilled in chunks of at most
`sliding_window` tokens into a rolling cache of `sliding_window` slots: peak memory is O(window)
however long the prompt or the generation.
"""

from __future__ import annotations

import json
import os
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from . import sampling
from ._util import is_int
from .cache import KVCache
from .errors import ConfigError, GenerationError
from .modeling import _Output

_DEFAULT_CHUNK = 1024  # prefill chunk for models without a window: bounds the mask's size
_COMPILED_BUCKET = 256  # a compiled decode's static cache grows in these steps


@dataclass
class GenerationConfig:
    """Settings of one generate() call; field names and defaults follow Transformers."""

    max_new_tokens: int | None = None
    max_length: int = 20
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    min_p: float | None = None  # sampling: drop tokens below min_p x the top token's probability
    no_repeat_ngram_size: int = 0  # never repeat an n-gram of the prompt and answer (0: off)
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    num_return_sequences: int = 1
    use_cache: bool = True
    seed: int | None = None
    prefill_chunk_size: int | None = None
    compile: bool = False  # ours: torch.compile the decode step (generation.Decoder)
    num_beams: int = 1  # > 1: beam search (beam_search.py), do_sample=False only
    num_beam_groups: int = 1  # group (diverse) beam search: refused unless 1
    length_penalty: float = 1.0  # beam scores are divided by (new tokens) ** length_penalty
    early_stopping: bool | str = False  # beam search: True, False (a heuristic) or "never"
    stop_strings: str | list[str] | None = None  # needs generate(tokenizer=...)
    return_dict_in_generate: bool = False
    output_scores: bool = False  # processed scores per step (return_dict_in_generate=True)
    output_logits: bool = False  # raw logits per step (return_dict_in_generate=True)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def update(self, **kwargs: Any) -> GenerationConfig:
        known = {f.name for f in fields(self)} - {"extra"}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"generate() got unexpected keyword arguments {unknown}")
        values = {**asdict(self), **kwargs}
        return GenerationConfig(**values)

    @property
    def eos_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise GenerationError naming the first invalid setting."""
        if self.max_new_tokens is not None and (not is_int(self.max_new_tokens) or self.max_new_tokens < 0):
            raise GenerationError(f"max_new_tokens must be a non-negative integer, got {self.max_new_tokens!r}")
        if not is_int(self.max_length) or self.max_length < 0:
            raise GenerationError(f"max_length must be a non-negative integer, got {self.max_length!r}")
        if not is_int(self.min_new_tokens) or self.min_new_tokens < 0:
            raise GenerationError(f"min_new_tokens must be a non-negative integer, got {self.min_new_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise GenerationError(f"temperature must be >= 0, got {self.temperature!r}")
        if self.do_sample and self.temperature == 0:
            raise GenerationError("temperature=0 with do_sample=True: use do_sample=False for greedy decoding")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not is_int(self.top_k) or self.top_k < 0:
            raise GenerationError(f"top_k must be a non-negative integer (0 disables it), got {self.top_k!r}")
        if not isinstance(self.repetition_penalty, (int, float)) or self.repetition_penalty <= 0:
            raise GenerationError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if self.min_p is not None and (isinstance(self.min_p, bool) or not isinstance(self.min_p, (int, float))
                                       or not 0 <= self.min_p <= 1):
            raise GenerationError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not is_int(self.no_repeat_ngram_size) or self.no_repeat_ngram_size < 0:
            raise GenerationError(f"no_repeat_ngram_size must be a non-negative integer (0 disables it), "
                                  f"got {self.no_repeat_ngram_size!r}")
        if not is_int(self.num_return_sequences) or self.num_return_sequences < 1:
            raise GenerationError(f"num_return_sequences must be >= 1, got {self.num_return_sequences!r}")
        self._validate_beams()
        if not (self.stop_strings is None or isinstance(self.stop_strings, str) or (
                isinstance(self.stop_strings, (list, tuple)) and all(isinstance(s, str) for s in self.stop_strings))):
            raise GenerationError(f"stop_strings must be a string or a list of strings, got {self.stop_strings!r}")
        if self.stop_strings is not None and not all(self.stop_list):
            raise GenerationError(f"stop_strings must be non-empty strings, got {self.stop_strings!r}")
        for name in ("return_dict_in_generate", "output_scores", "output_logits"):
            if not isinstance(getattr(self, name), bool):
                raise GenerationError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.compile, bool):
            raise GenerationError(f"compile must be True or False, got {self.compile!r}")
        if self.prefill_chunk_size is not None and (not is_int(self.prefill_chunk_size) or self.prefill_chunk_size < 1):
            raise GenerationError(f"prefill_chunk_size must be a positive integer, got {self.prefill_chunk_size!r}")
        ids = self.eos_ids + ([self.pad_token_id] if self.pad_token_id is not None else [])
        for token in ids:
            if not is_int(token) or token < 0 or (vocab_size is not None and token >= vocab_size):
                raise GenerationError(f"special token id {token!r} is out of range for vocab_size {vocab_size}")

    def _validate_beams(self) -> None:
        if not is_int(self.num_beams) or self.num_beams < 1:
            raise GenerationError(f"num_beams must be a positive integer, got {self.num_beams!r}")
        if self.num_beam_groups != 1:
            raise GenerationError(f"num_beam_groups={self.num_beam_groups!r}: group (diverse) beam search is not "
                                  "supported; use num_beam_groups=1")
        if self.num_beams > 1 and self.do_sample:
            raise GenerationError("num_beams > 1 with do_sample=True (beam sampling) is not supported; use "
                                  "do_sample=False for beam search, or num_beams=1 to sample")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise GenerationError(f"num_return_sequences={self.num_return_sequences} is more than num_beams="
                                  f"{self.num_beams}: beam search returns at most num_beams sequences per prompt")
        if self.num_return_sequences > 1 and not self.do_sample and self.num_beams == 1:
            raise GenerationError("num_return_sequences > 1 needs do_sample=True or num_beams > 1: greedy decoding "
                                  "would repeat one answer")
        if self.early_stopping not in (True, False, "never"):
            raise GenerationError(f'early_stopping must be True, False or "never", got {self.early_stopping!r}')
        if isinstance(self.length_penalty, bool) or not isinstance(self.length_penalty, (int, float)):
            raise GenerationError(f"length_penalty must be a number, got {self.length_penalty!r}")

    @property
    def stop_list(self) -> list[str]:
        stops = self.stop_strings
        return [] if stops is None else [stops] if isinstance(stops, str) else list(stops)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> GenerationConfig:
        """Read generation_config.json (unknown keys are kept aside, not applied)."""
        file = Path(folder) / "generation_config.json"
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise GenerationError(f"cannot read {file}: {exc}") from exc
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in data.items() if k in known},
                   extra={k: v for k, v in data.items() if k not in known})


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


@dataclass
class GenerateDecoderOnlyOutput(_Output):
    """generate(return_dict_in_generate=True) without beams; Transformers' field names.
    `scores` / `logits`: one (rows, V) tensor per step, when output_scores / output_logits."""

    sequences: torch.Tensor
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    attentions: None = None
    hidden_states: None = None
    cache: None = None


@dataclass
class GenerateBeamDecoderOnlyOutput(_Output):
    """generate(num_beams > 1, return_dict_in_generate=True); Transformers' field names.
    `sequences_scores` (rows,) is set with output_scores; `beam_indices` (rows, new tokens) names
    the flat beam each step's token extended (-1 after a row's end)."""

    sequences: torch.Tensor
    sequences_scores: torch.Tensor | None = None
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    beam_indices: torch.Tensor | None = None
    attentions: None = None
    hidden_states: None = None
    cache: None = None


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
        token = sampling.choose(scores, gen.do_sample, generator)
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


def left_padding(mask: torch.Tensor) -> torch.Tensor:
    """(B,) the length of each row's leading padding: the repetition penalty skips it."""
    return (mask != 0).int().argmax(dim=1)


def prefill(model: Any, cache: KVCache, ids: torch.Tensor, mask: torch.Tensor, chunk: int) -> torch.Tensor:
    """Read the prompts (B, T) into `cache` in chunks of at most `chunk` tokens; the logits
    (B, V) after the last one. A rolling cache needs chunks of at most W to stay O(W) in memory."""
    out = None
    for start in range(0, ids.shape[1], chunk):
        end = min(start + chunk, ids.shape[1])
        out = model(ids[:, start:end], attention_mask=mask[:, :end], past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
    assert out is not None
    return out.logits[:, -1]


def _recompute(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """use_cache=False: the whole sequence again every step."""
    return model(ids, attention_mask=mask, use_cache=False, logits_to_keep=1).logits[:, -1]


class Decoder:
    """The decode step every driver runs (generate() and the server's engine): one token per
    row at explicit absolute positions into a cache; returns the next logits (B, V).

    `compile=True` runs the layers through torch.compile: a decode step of a small model on
    4-bit weights is mostly fixed per-operator cost that compiling fuses away (bench/RESULTS.md);
    the first call pays the compile, so it is opt-in. The compiled layers are made once per
    model and reused by later calls.
    """

    def __init__(self, model: Any, compile: bool = False) -> None:
        self.model = model
        self.layers = compiled_layers(model.model) if compile else None

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """tokens, positions (B,) -> logits (B, V)."""
        if self.layers is None:
            out = self.model(tokens[:, None], position_ids=positions[:, None], past_key_values=cache,
                             use_cache=True, logits_to_keep=1)
            return out.logits[:, -1]
        decoder = self.model.model
        h = decoder.embed_tokens(tokens[:, None])
        step = decoder.prepare_step(h, None, positions[:, None], cache)
        h = self.layers(h, step, cache)
        cache.commit(step.plan)
        return self.model.lm_head(h)[:, -1]


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled_layers(decoder: Any) -> Any:
    """`torch.compile(decoder.decode_layers)`, made once per decoder (idempotent)."""
    if len({layer.input_layernorm.weight.device for layer in decoder.layers}) > 1:
        raise ConfigError("compiled decoding needs every layer on one device; drop compile=True "
                          "for a model split by device_map")
    if decoder not in _COMPILED:
        _COMPILED[decoder] = torch.compile(decoder.decode_layers)
    return _COMPILED[decoder]
