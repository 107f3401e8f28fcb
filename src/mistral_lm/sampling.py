"""Logits processors and samplers: pure functions of (logits, ids, settings).

Each processor follows the definition Transformers documents, in the same order (repetition
penalty, then temperature, top-k, top-p), so seeded sampling is comparable across libraries.
Filtering sets logits to -inf; at least one token always survives.

OpenAI's additive adjustments (`logit_bias`, `presence_penalty`, `frequency_penalty`) come first,
before the repetition penalty and temperature, as vLLM applies them; they also steer greedy picks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .errors import GenerationError
from .native import draw

Picker = Callable[[torch.Tensor, torch.Tensor, "torch.Generator | None"], torch.Tensor]


def repetition_penalty(logits: torch.Tensor, ids: torch.Tensor, penalty: float,
                       skip: torch.Tensor | None = None) -> torch.Tensor:
    """CTRL's penalty: scores of tokens already in `ids` are divided by `penalty` if positive,
    multiplied if negative. `skip` (B,): leading positions of each row not counted (its left
    padding, as Transformers leaves it out); they point at a spare column dropped afterwards."""
    if penalty == 1.0:
        return logits
    if skip is not None:
        vocab = logits.shape[-1]
        ids = ids.masked_fill(torch.arange(ids.shape[1], device=ids.device) < skip[:, None], vocab)
        logits = torch.nn.functional.pad(logits, (0, 1))
    seen = torch.gather(logits, 1, ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    out = logits.scatter(1, ids, seen)
    return out if skip is None else out[:, :vocab]


def openai_penalties(logits: torch.Tensor, ids: torch.Tensor, presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's definition: logit[j] -= c[j] * frequency + (c[j] > 0) * presence, where c[j] counts
    token j in `ids` (B, L): the tokens generated so far, not the prompt's, as OpenAI and vLLM count."""
    if (presence == 0 and frequency == 0) or ids.shape[1] == 0:
        return logits
    counts = torch.zeros_like(logits).scatter_add_(1, ids, torch.ones_like(ids, dtype=logits.dtype))
    return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


def add_bias(logits: torch.Tensor, bias: dict[int, float]) -> torch.Tensor:
    """OpenAI's `logit_bias`: `bias[j]` added to every row's logit of token j."""
    if not bias:
        return logits
    ids = torch.tensor(list(bias), device=logits.device)
    values = torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)
    return logits.index_add(1, ids, values.expand(logits.shape[0], -1))


def temperature_scale(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits if temperature == 1.0 else logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k highest logits per row (ties with the k-th are kept); k=0 keeps all."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def ascending_order(logits: torch.Tensor) -> torch.Tensor:
    """`torch.sort(logits, dim=-1, stable=True).indices`: ascending, ties in index order, NaN last.

    float32 CPU rows go through one numpy sort of 64-bit keys (the value's bits in an order that
    sorts as the floats do, then the index): torch's stable sort over a vocabulary cost a top-p
    sampled token more than the model's decode step (bench/RESULTS.md)."""
    if logits.dtype != torch.float32 or logits.device.type != "cpu" or logits.dim() < 1 or not logits.shape[-1]:
        return torch.sort(logits, dim=-1, stable=True).indices
    rows = logits.detach().reshape(-1, logits.shape[-1]).numpy()
    index = np.arange(rows.shape[-1], dtype=np.uint64)
    out = np.empty(rows.shape, dtype=np.int64)
    for r, row in enumerate(rows):
        row = np.where(np.isnan(row), np.float32(np.nan), row + np.float32(0.0))  # one NaN, -0.0 as +0.0
        bits = row.view(np.int32).astype(np.int64)
        key = np.where(bits < 0, ~bits & 0xFFFFFFFF, bits | 0x80000000).astype(np.uint64)  # float order, unsigned
        out[r] = (np.sort((key << np.uint64(32)) | index) & np.uint64(0xFFFFFFFF)).astype(np.int64)
    return torch.from_numpy(out).reshape(logits.shape)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability reaches p."""
    if p >= 1.0:
        return logits
    order = ascending_order(logits)  # ties: lower index dropped first
    sorted_logits = logits.gather(-1, order)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= 1 - p  # the low tail whose mass is at most 1 - p
    remove_sorted[..., -1] = False  # the most likely token always stays
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def suppress(logits: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """Forbid `token_ids` (used to hold back EOS until min_new_tokens)."""
    if not token_ids:
        return logits
    # index_fill rather than `logits[:, token_ids] = -inf`: indexing with a list costs ~5x more
    return logits.index_fill(-1, torch.tensor(token_ids, device=logits.device), float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float | None) -> torch.Tensor:
    """Drop tokens whose probability is below `min_p` times the most likely token's (the top one
    always stays); None or 0 filters nothing."""
    if not min_p:
        return logits
    probs = logits.float().softmax(dim=-1)
    return logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))


def no_repeat_ngram(logits: torch.Tensor, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Ban, in each row, every token that would complete an n-gram already in that row's `ids`
    (the tokens after each earlier occurrence of the last n-1 ids); 0 bans nothing."""
    if n <= 0 or ids.shape[1] + 1 < n:
        return logits
    banned: list[tuple[int, int]] = []
    for b, row in enumerate(ids.tolist()):
        tail = row[len(row) - n + 1:] if n > 1 else []
        banned += [(b, row[i + n - 1]) for i in range(len(row) - n + 1) if row[i:i + n - 1] == tail]
    if not banned:
        return logits
    rows, cols = zip(*banned)
    out = logits.clone()
    out[list(rows), list(cols)] = float("-inf")
    return out


def process(
    logits: torch.Tensor, ids: torch.Tensor, *, do_sample: bool, temperature: float, top_k: int,
    top_p: float, repetition_penalty_value: float, min_p: float | None = None, no_repeat_ngram_size: int = 0,
    skip: torch.Tensor | None = None,
) -> torch.Tensor:
    """All processors in Transformers' order; warpers only apply when sampling. `skip`: see
    `repetition_penalty`."""
    logits = repetition_penalty(logits, ids, repetition_penalty_value, skip)
    logits = no_repeat_ngram(logits, ids, no_repeat_ngram_size)
    if do_sample:
        logits = min_p_filter(top_p_filter(top_k_filter(temperature_scale(logits, temperature), top_k), top_p), min_p)
    return logits


Processor = Callable[..., torch.Tensor]


def make_processor(config: Any, *, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                   logit_bias: dict[int, float] | None = None) -> Processor:
    """`process(logits (B, V), history (B, L), skip=None) -> scores (B, V)` in float32: every
    processor and (when sampling) warper of `config`, as Transformers' `output_scores` records
    them; `skip` (B,) leading history positions the repetition penalty ignores (left padding).

    The OpenAI keywords (`openai_penalties`, `add_bias`) count the tokens of `history`: pass the
    generated tokens only when using them (the server does; generate() leaves them at 0)."""
    do_sample, temperature, top_k, top_p = config.do_sample, config.temperature, config.top_k, config.top_p
    penalty = config.repetition_penalty
    min_p, ngram = getattr(config, "min_p", None), getattr(config, "no_repeat_ngram_size", 0)
    bias = dict(logit_bias or {})

    def scores(logits: torch.Tensor, history: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        out = add_bias(openai_penalties(logits.float(), history, presence_penalty, frequency_penalty), bias)
        return process(out, history, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                       repetition_penalty_value=penalty, min_p=min_p, no_repeat_ngram_size=ngram, skip=skip)

    return scores


Sampler = Callable[[torch.Tensor, "torch.Generator | None"], torch.Tensor]


def make_picker(config: Any, **openai: Any) -> Picker:
    """`pick(logits (B, V), history (B, L), generator) -> (B,)` token ids, with `config`'s
    settings (a GenerationConfig, its `sampler` included) read once per request rather than on
    every step; `openai` as `make_processor`'s keywords."""
    scores = make_processor(config, **openai)
    draw = SAMPLERS[getattr(config, "sampler", "multinomial")]

    def pick(logits: torch.Tensor, history: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return choose(scores(logits, history), config.do_sample, generator, draw)

    return pick


def choose(scores: torch.Tensor, do_sample: bool, generator: torch.Generator | None = None,
           draw: Sampler | None = None) -> torch.Tensor:
    """The next token per row from processed `scores` (B, V): drawn (by `draw`, default
    `sample`), or the argmax."""
    return (draw or sample)(scores, generator) if do_sample else greedy(scores)


def sample(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row, drawn from softmax(logits) with an explicit generator: torch's
    multinomial, as transformers' generate() draws, so a seeded generate() samples its tokens.
    The draw runs in C where it can (native/draw.py: the same tokens and generator state)."""
    probs = logits.float().softmax(dim=-1)
    drawn = draw.multinomial(probs, generator)
    return drawn if drawn is not None else torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sample_by_inverse_cdf(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of `logits` (B, V) from its softmax, by one uniform number per row and
    the cumulative distribution (float64). The server's and the CLI's sampler (GenerationConfig
    sampler="inverse_cdf"): torch.multinomial draws an exponential number for every vocabulary
    entry, which cost a server more per sampled row than its batched decode step
    (bench/RESULTS.md). Another stream of draws than `sample`'s for the same seed, so generate()
    keeps that one by default. A token of probability 0 (a -inf logit) is never drawn; a row
    with no finite logit raises."""
    probs = logits.float().softmax(dim=-1).double()
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    if not bool(torch.isfinite(total).all() and (total > 0).all()):
        raise GenerationError("no token can be sampled: every token's probability is zero or undefined "
                              "(all logits -inf or NaN)")
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64, device=probs.device)
    picked = torch.searchsorted(cdf, u * total, right=True)[:, 0]
    # u * total can round up to total itself: then the last token with a probability
    past = picked >= probs.shape[-1]
    if bool(past.any()):
        last = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(dim=-1)
        picked = torch.where(past, last, picked)
    return picked


# GenerationConfig.sampler -> the draw
SAMPLERS: dict[str, Sampler] = {"multinomial": sample, "inverse_cdf": sample_by_inverse_cdf}


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The argmax per row: the first of tied maxima, a NaN before any number, as torch's.
    float32 rows on the CPU go through numpy, whose argmax over a vocabulary is ~20x faster
    than torch's single-row reduction and is paid once per decoded token (bench/RESULTS.md)."""
    if logits.dtype == torch.float32 and logits.device.type == "cpu" and logits.dim() >= 1 and logits.shape[-1]:
        return torch.from_numpy(np.asarray(logits.detach().numpy().argmax(axis=-1), dtype=np.int64))
    return logits.argmax(dim=-1)
