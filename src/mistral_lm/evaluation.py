"""Teacher-forced accuracy of a model against a reference: top-1 agreement and perplexity.

Why these two numbers: quantization (int8, int4, nf4, bf16, GGUF-native blocks) changes the
logits a little; what a user sees is whether greedy decoding picks the same token (top-1
agreement with the float32 model, position by position on the same text) and how much worse
the model predicts real text (perplexity, reported relative to float32). Both are measured
teacher-forced: every position sees the true prefix, so one early disagreement does not
cascade the way it would in free generation, and the numbers are comparable across modes.

Memory stays bounded for long texts: the sequence goes through the model's KV cache in
chunks, and of each chunk's (chunk, vocab) logits only two numbers per position are kept, the
log-probability of the true next token and the argmax id. Keeping all float logits of 2,000
tokens of a 49k vocab would be 390 MB.

>>> import torch
>>> from mistral_lm import MistralConfig, MistralForCausalLM
>>> cfg = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
...                     num_attention_heads=2, num_key_value_heads=1, sliding_window=None)
>>> model = MistralForCausalLM(cfg).eval()
>>> scores = token_logprobs(model, torch.randint(0, 64, (1, 20)), chunk_size=8)
>>> scores.tokens, compare(scores, scores).top1_agreement
(19, 1.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ConfigError, InputError

__all__ = ["MODES", "Comparison", "TokenScores", "compare", "mode_kwargs", "perplexity", "reference_text_ids",
           "token_logprobs"]

# The precision modes the accuracy checks compare with float32, as `from_pretrained` keywords.
# int4 uses groups of 32 (the default): a Q4_0/Q4_1 GGUF file's block size, so re-quantizing such
# a file's weights lands on (nearly) the same grid; int4-g64 shows what compounding two 4-bit
# roundings on different grids costs.
MODES = ("fp32", "bf16", "int8", "int4", "int4-g64", "nf4", "gguf-native")


@dataclass(frozen=True)
class TokenScores:
    """Per-position results of teacher-forced evaluation of one sequence of N tokens.

    Position i (0 <= i < N-1) is the prediction made after reading tokens 0..i:
    `logprobs[i]` = log p(token i+1 | tokens 0..i) (float32), `predictions[i]` = the argmax id,
    `margins[i]` = top-1 minus top-2 log-prob (how decided the prediction is: changing
    each logit by less than half of it cannot change the argmax), `targets[i]` = token i+1 (kept
    so `compare` can check both runs scored the same text). All are 1-D CPU tensors of length N-1.
    """

    logprobs: torch.Tensor
    predictions: torch.Tensor
    margins: torch.Tensor
    targets: torch.Tensor

    @property
    def tokens(self) -> int:
        """Number of scored positions (N - 1)."""
        return int(self.targets.numel())


@dataclass(frozen=True)
class Comparison:
    """A candidate model's scores against a reference's on the same text.

    `ppl_increase` is relative: 0.02 means the candidate's perplexity is 2 % above the reference's.
    `decisive_agreement` is the top-1 agreement restricted to the `decisive_tokens` positions
    where the reference's top-1 beats its top-2 by at least `decisive_margin` log-prob: near
    ties flip under any rounding (casting to bfloat16 alone flips some), so this separates
    "the model changed its mind" from "a coin toss landed the other way".
    """

    tokens: int
    top1_agreement: float
    decisive_agreement: float
    decisive_tokens: int
    ppl: float
    ppl_reference: float
    ppl_increase: float


def _check_ids(input_ids: Any) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor):
        raise InputError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise InputError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    ids = input_ids[None] if input_ids.dim() == 1 else input_ids
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise InputError(f"input_ids must be one sequence, (N,) or (1, N), got shape {tuple(input_ids.shape)}")
    if ids.shape[1] < 2:
        raise InputError(f"input_ids needs at least 2 tokens (one prediction and its target), got {ids.shape[1]}")
    return ids.long()


@torch.inference_mode()
def token_logprobs(model: Any, input_ids: torch.Tensor, chunk_size: int = 512) -> TokenScores:
    """Teacher-forced log-prob of each next token and the model's top-1 prediction.

    `model` is a `MistralForCausalLM` (anything with `.model.make_cache` and the same forward).
    The first N-1 tokens are fed in chunks of `chunk_size` through one KV cache, exactly as
    generate() prefills a prompt, so the result equals one unchunked forward up to float
    rounding; the last token is only a target. Of each chunk's logits, computed in float32
    whatever the model's dtype, only the true token's log-prob, the argmax and its margin over
    the runner-up are kept.
    """
    ids = _check_ids(input_ids)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise InputError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    vocab = model.config.vocab_size
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        raise InputError(f"token id {lo if lo < 0 else hi} is out of range for the model's vocab_size {vocab}")
    n = ids.shape[1]
    inputs, targets = ids[:, :-1], ids[0, 1:]
    cache = model.model.make_cache(1, max_length=n - 1)
    logprobs, predictions, margins = [], [], []
    for start in range(0, n - 1, chunk_size):
        end = min(start + chunk_size, n - 1)
        logits = model(inputs[:, start:end], past_key_values=cache, use_cache=True).logits[0]
        logp = torch.log_softmax(logits.float(), dim=-1)
        chunk_targets = targets[start:end].to(logp.device)
        logprobs.append(logp.gather(-1, chunk_targets[:, None])[:, 0].cpu())
        predictions.append(logp.argmax(-1).cpu())  # argmax: ties go to the lowest id, documented
        top2 = logp.topk(min(2, vocab), dim=-1).values
        margins.append((top2[:, 0] - top2[:, -1]).cpu())
        del logits, logp  # the next chunk reuses this memory
    return TokenScores(torch.cat(logprobs), torch.cat(predictions), torch.cat(margins), targets.clone())


def perplexity(scores: TokenScores) -> float:
    """exp(mean negative log-likelihood) over the scored positions, the standard definition."""
    return math.exp(-float(scores.logprobs.double().mean()))


def compare(candidate: TokenScores, reference: TokenScores, decisive_margin: float = 0.1) -> Comparison:
    """Top-1 agreement and perplexities of `candidate` against `reference` on the same text.

    Takes scores rather than models so one reference run serves every candidate. Raises
    InputError when the two runs scored different token sequences: agreement between
    predictions for different texts would be meaningless.
    """
    if not torch.equal(candidate.targets, reference.targets):
        raise InputError(
            f"the candidate scored {candidate.tokens} positions and the reference {reference.tokens}, "
            "not the same token sequence; evaluate both on the same input_ids"
        )
    if not decisive_margin >= 0:
        raise InputError(f"decisive_margin must be >= 0, got {decisive_margin!r}")
    ppl, ppl_ref = perplexity(candidate), perplexity(reference)
    same = candidate.predictions == reference.predictions
    decisive = reference.margins >= decisive_margin
    n_decisive = int(decisive.sum())
    decisive_agreement = float(same[decisive].double().mean()) if n_decisive else float("nan")
    return Comparison(candidate.tokens, float(same.double().mean()), decisive_agreement, n_decisive,
                      ppl, ppl_ref, ppl / ppl_ref - 1.0)


def mode_kwargs(mode: str) -> dict[str, Any]:
    """The `MistralForCausalLM.from_pretrained` keywords of one of `MODES` (a fresh config each call).

    One table shared by the accuracy test and the benchmark, so both measure the same thing.
    """
    from .quantization import BitsAndBytesConfig

    table: dict[str, dict[str, Any]] = {
        "fp32": {},
        "bf16": {"torch_dtype": torch.bfloat16},
        "int8": {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)},
        "int4": {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="int4")},
        "int4-g64": {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="int4",
                                                               group_size=64)},
        "nf4": {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")},
        "gguf-native": {"gguf_native": True},
    }
    if mode not in table:
        raise ConfigError(f"unknown mode {mode!r}; choose one of {MODES}")
    return table[mode]


def reference_text_ids(tokenizer: Any, n_tokens: int = 2000) -> torch.Tensor:
    """`n_tokens` + 1 token ids (shape (1, n_tokens + 1)) of fixed English text, for the accuracy checks.

    The text is Python's own reference documentation, `pydoc_data.topics.topics`, topics
    concatenated in sorted key order: real English prose (with some code, as a chat model also
    sees) that ships with every CPython, so the measurement needs no download and no file of
    ours, and the text was not written by or for this project. Its content follows the Python
    version, so the exact numbers may shift slightly between Python versions; thresholds on
    them should keep a margin. The tokenizer's defaults apply (a BOS token first where it adds
    one). The extra token is the target of the last of `n_tokens` predictions.
    """
    from pydoc_data.topics import topics

    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise InputError(f"n_tokens must be a positive integer, got {n_tokens!r}")
    parts: list[str] = []
    ids: list[int] = []
    for key in sorted(topics):
        parts.append(topics[key])
        ids = tokenizer("\n\n".join(parts))["input_ids"]
        if len(ids) > n_tokens:
            return torch.tensor([ids[: n_tokens + 1]], dtype=torch.long)
    raise InputError(f"pydoc_data.topics has only {len(ids)} tokens with this tokenizer; asked for {n_tokens} + 1")
