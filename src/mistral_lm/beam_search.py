"""Beam search: generate(num_beams=K > 1, do_sample=False), step for step as Transformers' beam
search, so that ids, scores and beam indices agree with it.

Each prompt keeps K running beams and the K best finished hypotheses. A step scores every
continuation of every running beam (sum of log-probabilities after the logits processors),
keeps the best M = max(2, 1 + number of eos ids) * K candidates, so that K of them can run on
even if the best ones all end, and then:
- candidates that end (an eos, a stop string, the length limit) among the best K may enter the
  finished set, scored sum / (new tokens ** length_penalty);
- the best K that did not end become the running beams, and the cache rows follow them
  (`KVCache.reorder_cache`).
The search ends when every candidate hit the length limit, when `early_stopping=True` and
K hypotheses finished, or when no running beam can beat the worst finished one any more (the
length-penalty heuristics of `early_stopping=False` / "never", `can_improve`).

Masked entries get -1e9 added rather than -inf, as Transformers does, so that ties among them
resolve alike. Notation: B prompts, K beams, M candidates, V vocabulary, L = T + N ids per row
(prompt T, at most N new tokens).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from . import sampling
from .decoding import _DEFAULT_CHUNK, Decoder, left_padding, prefill
from .generation_config import GenerateBeamDecoderOnlyOutput, GenerationConfig

_MASKED = -1.0e9


@dataclass(frozen=True)
class Beams:
    """The search's state for B prompts."""

    seqs: torch.Tensor  # (B, K, L) running beams' ids; `fill` past the current length
    scores: torch.Tensor  # (B, K) their summed log-probabilities, best first
    origins: torch.Tensor  # (B, K, N) per step, the flat beam (b * K + k) each extended; -1 before
    done_seqs: torch.Tensor  # (B, K, L) the best finished hypotheses (or placeholders)
    done_scores: torch.Tensor  # (B, K) their length-penalised scores, best first
    done_origins: torch.Tensor  # (B, K, N)
    done: torch.Tensor  # (B, K) which of those are real finished hypotheses
    open: torch.Tensor  # (B, 1) whether a running beam may still beat the finished ones


def start(ids: torch.Tensor, k: int, max_new: int, fill: int) -> Beams:
    """K copies of each prompt (B, T); only the first is live (the others score -1e9), so the
    first step does not pick the same continuation K times."""
    b, t = ids.shape
    seqs = torch.full((b, k, t + max_new), fill, dtype=torch.long, device=ids.device)
    seqs[:, :, :t] = ids[:, None]
    scores = torch.zeros(b, k, device=ids.device)
    scores[:, 1:] = _MASKED
    origins = torch.full((b, k, max_new), -1, dtype=torch.long, device=ids.device)
    return Beams(seqs, scores, origins, seqs.clone(), torch.full_like(scores, _MASKED), origins.clone(),
                 torch.zeros(b, k, dtype=torch.bool, device=ids.device),
                 torch.ones(b, 1, dtype=torch.bool, device=ids.device))


def _take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t (B, K, ...) at beams `index` (B, J) -> (B, J, ...)."""
    return torch.take_along_dim(t, index.view(*index.shape, *[1] * (t.dim() - 2)), dim=1)


def candidates(total: torch.Tensor, beams: Beams, length: int, step: int, m: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The best `m` continuations per prompt of `total` (B, K * V) summed log-probs: their
    scores (B, M), ids (B, M, L) with the new token at `length`, and origins (B, M, N)."""
    b, k = beams.scores.shape
    scores, flat = torch.topk(total, m)  # (B, M)
    vocab = total.shape[1] // k
    beam, token = flat // vocab, flat % vocab
    seqs, origins = _take(beams.seqs, beam), _take(beams.origins, beam)
    seqs[:, :, length] = token
    origins[:, :, step] = beam + torch.arange(b, device=beam.device)[:, None] * k
    return scores, seqs, origins


def running(scores: torch.Tensor, seqs: torch.Tensor, origins: torch.Tensor, ended: torch.Tensor, k: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The best k candidates that did not end (B, M) -> the next running beams."""
    scores = scores + ended.float() * _MASKED
    best = torch.topk(scores, k).indices
    return _take(seqs, best), _take(scores, best), _take(origins, best)


def finish(beams: Beams, scores: torch.Tensor, seqs: torch.Tensor, origins: torch.Tensor, ended: torch.Tensor,
           new_tokens: int, length_penalty: float, early_stopping: bool | str) -> Beams:
    """Merge the candidates among the best K that ended into the K best finished hypotheses."""
    k = beams.scores.shape[1]
    entering = ended & (torch.arange(ended.shape[1], device=ended.device) < k)
    scores = scores / (new_tokens ** length_penalty)
    full = beams.done.all(dim=-1, keepdim=True) & (early_stopping is True)
    scores = scores + full.float() * _MASKED  # early_stopping=True: K finished are final
    scores = scores + (~beams.open).float() * _MASKED  # no candidate can improve on them
    scores = scores + (~entering).float() * _MASKED
    merged_scores = torch.cat([beams.done_scores, scores], dim=1)
    best = torch.topk(merged_scores, k).indices
    return replace(beams, done_scores=_take(merged_scores, best),
                   done_seqs=_take(torch.cat([beams.done_seqs, seqs], dim=1), best),
                   done_origins=_take(torch.cat([beams.done_origins, origins], dim=1), best),
                   done=_take(torch.cat([beams.done, entering], dim=1), best))


def can_improve(beams: Beams, new_tokens: int, max_new: int, length_penalty: float,
                early_stopping: bool | str) -> torch.Tensor:
    """(B, 1): may the best running beam still beat the worst finished hypothesis? Its best
    possible score is its score now, length-penalised at the current length, or at the longest
    with early_stopping="never" and a positive length_penalty (longer then scores better)."""
    longest = early_stopping == "never" and length_penalty > 0.0
    best = beams.scores[:, :1] / ((max_new if longest else new_tokens) ** length_penalty)
    worst = torch.where(beams.done, beams.done_scores.min(dim=1, keepdim=True).values, _MASKED)
    return beams.open & (best > worst).any(dim=-1, keepdim=True)


def ended(seqs: torch.Tensor, eos: list[int], stop: Callable[[torch.Tensor], torch.Tensor] | None,
          at_limit: bool) -> torch.Tensor:
    """(B, M, length) candidate ids -> (B, M) which end: eos last, a stop string, or the limit."""
    if at_limit:
        return torch.ones(seqs.shape[:2], dtype=torch.bool, device=seqs.device)
    out = torch.isin(seqs[:, :, -1], torch.tensor(eos, dtype=torch.long, device=seqs.device))
    if stop is not None:
        out |= stop(seqs.flatten(0, 1)).view(seqs.shape[:2])
    return out


def fill_value(gen: GenerationConfig) -> int:
    """What pads a hypothesis that ended before the longest: Transformers' choice, the pad id
    (the first eos when unset or 0) if there are eos ids, else -1."""
    eos = gen.eos_ids
    return (gen.pad_token_id or eos[0]) if eos else -1


def beam_search(model: Any, ids: torch.Tensor, mask: torch.Tensor, gen: GenerationConfig, max_new: int,
                stop: Callable[[torch.Tensor], torch.Tensor] | None = None) -> GenerateBeamDecoderOnlyOutput:
    """Beam search over the (left-padded) prompts `ids`, `mask` (B, T); the best
    `num_return_sequences` hypotheses per prompt, as generate(return_dict_in_generate=True)."""
    b, t = ids.shape
    k, eos, n_out = gen.num_beams, gen.eos_ids, gen.num_return_sequences
    if max_new == 0:
        return GenerateBeamDecoderOnlyOutput(ids.repeat_interleave(n_out, dim=0))
    beams = start(ids, k, max_new, fill_value(gen))
    m = max(2, 1 + len(eos)) * k
    process = sampling.make_processor(gen)
    step_fn = Decoder(model, compile=gen.compile)
    cache = model.make_cache(b, max_length=t + max_new)
    window = model.config.sliding_window
    chunk = gen.prefill_chunk_size or (window if window is not None else _DEFAULT_CHUNK)
    logits = prefill(model, cache, ids, mask, chunk).repeat_interleave(k, dim=0)  # (B * K, V)
    cache.reorder_cache(torch.arange(b, device=ids.device).repeat_interleave(k))  # each prompt's keys K times
    positions = mask.sum(dim=1).repeat_interleave(k)
    padding = left_padding(mask).repeat_interleave(k)
    all_scores, all_logits = [], []
    for step in range(max_new):
        length = t + step
        logits = logits.float()
        log_probs = logits.log_softmax(dim=-1)
        if step < gen.min_new_tokens:
            log_probs = sampling.suppress(log_probs, eos)
        log_probs = process(log_probs, beams.seqs[:, :, :length].flatten(0, 1), padding)  # (B * K, V)
        if gen.return_dict_in_generate:
            all_scores.append(log_probs)
            all_logits.append(logits)
        total = (log_probs.view(b, k, -1) + beams.scores[:, :, None]).view(b, -1)
        scores, seqs, origins = candidates(total, beams, length, step, m)
        end = ended(seqs[:, :, : length + 1], eos, stop, at_limit=step + 1 == max_new)
        run_seqs, run_scores, run_origins = running(scores, seqs, origins, end, k)
        beams = finish(beams, scores, seqs, origins, end, step + 1, gen.length_penalty, gen.early_stopping)
        beams = replace(beams, seqs=run_seqs, scores=run_scores, origins=run_origins)
        beams = replace(beams, open=can_improve(beams, step + 1, max_new, gen.length_penalty, gen.early_stopping))
        full = bool(beams.done.all()) and gen.early_stopping is True
        if not bool(beams.open.any()) or full or bool(end.all()):
            break
        cache.reorder_cache(beams.origins[:, :, step].flatten())
        logits = step_fn(beams.seqs[:, :, length].flatten(), positions, cache)  # each beam's newest token
        positions = positions + 1
    return _output(beams, t, n_out, gen, all_scores, all_logits)


def _output(beams: Beams, t: int, n_out: int, gen: GenerationConfig, scores: list[torch.Tensor],
            logits: list[torch.Tensor]) -> GenerateBeamDecoderOnlyOutput:
    """The best `n_out` finished hypotheses per prompt, cut to the longest of them."""
    seqs = beams.done_seqs[:, :n_out].flatten(0, 1)
    origins = beams.done_origins[:, :n_out].flatten(0, 1)
    new = int((origins >= 0).sum(dim=1).max())
    return GenerateBeamDecoderOnlyOutput(
        sequences=seqs[:, : t + new],
        sequences_scores=beams.done_scores[:, :n_out].flatten() if gen.output_scores else None,
        scores=tuple(scores) if gen.output_scores else None,
        logits=tuple(logits) if gen.output_logits else None,
        beam_indices=origins[:, :new],
    )
