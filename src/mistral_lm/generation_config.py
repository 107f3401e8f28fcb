"""GenerationConfig and generate()'s output objects: the settings, validated, and what comes back.

Kept apart from generation.py so the drivers (generation.py, beam_search.py) can share them
without importing each other.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from ._util import Output, is_int
from .errors import GenerationError
from .sampling import SAMPLERS


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
    # ours: how a sampled token is drawn (sampling.SAMPLERS): "multinomial", torch's, which a seeded
    # run shares with Transformers' generate(); "inverse_cdf", one uniform number a row, much faster
    # on large vocabularies (the CLI's and the server's)
    sampler: str = "multinomial"
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
        if self.sampler not in SAMPLERS:
            raise GenerationError(f"sampler must be one of {sorted(SAMPLERS)}, got {self.sampler!r}")
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


@dataclass
class GenerateDecoderOnlyOutput(Output):
    """generate(return_dict_in_generate=True) without beams; Transformers' field names.
    `scores` / `logits`: one (rows, V) tensor per step, when output_scores / output_logits."""

    sequences: torch.Tensor
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    attentions: None = None
    hidden_states: None = None
    cache: None = None


@dataclass
class GenerateBeamDecoderOnlyOutput(Output):
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
