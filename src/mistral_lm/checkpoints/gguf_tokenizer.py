"""A tokenizer rebuilt from a GGUF file's `tokenizer.ggml.*` metadata.

A GGUF carries no `tokenizer.json`, only the pieces llama.cpp needs. The two kinds a Llama or
Mistral file uses are rebuilt as a `tokenizers.Tokenizer`:

- `"llama"`: SentencePiece BPE (Llama 2, Mistral v0.1-v0.3). Pieces, scores and piece types, no
  merges. SentencePiece merges, at every step, the adjacent pair whose result scores highest; a
  `tokenizers` BPE applies the best-ranked merge. Ranking every split of each piece by that
  piece's score makes the two agree; `byte_fallback` spells characters outside the vocabulary as
  <0xXX> pieces, as SentencePiece does; a normalizer writes spaces as U+2581 and adds the dummy
  prefix. Ids equal sentencepiece's (tested on Mistral-7B-v0.1's vocabulary).
- `"gpt2"`: byte-level BPE (SmolLM2; Mistral-Nemo's Tekken with pre "tekken") with explicit merges; how text is split before the merges
  depends on `tokenizer.ggml.pre`, one entry per supported value in `_BYTE_LEVEL_SPLITS`; any
  other value is refused rather than guessed, since a wrong split silently changes ids.

Tokens the file types CONTROL (and the UNKNOWN piece) become special tokens and USER_DEFINED ones
plain added tokens, so text like "<|im_start|>" maps to one id instead of being cut into pieces.

The tokenizer package calls `gguf_tokenizer_parts(read_gguf(path))`; nothing in `checkpoints/`
imports the tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from ..errors import TokenizerError

if TYPE_CHECKING:
    from .gguf import GGUFFile

__all__ = ["gguf_tokenizer_parts"]

# llama.cpp's token types (gguf.TokenType), the same numbers as SentencePiece's piece types.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4
_SPACE = "\u2581"  # SentencePiece's visible space


def _gpt2_split() -> list[pre_tokenizers.PreTokenizer]:
    return [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]


def _digits_then_gpt2_split() -> list[pre_tokenizers.PreTokenizer]:
    return [pre_tokenizers.Digits(individual_digits=True), *_gpt2_split()]


# Mistral's Tekken (Nemo, Small, Pixtral): the `config.pattern` of tekken.json, as llama.cpp's "tekken".
_TEKKEN_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
                   r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}|"
                   r" ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _tekken_split() -> list[pre_tokenizers.PreTokenizer]:
    return [pre_tokenizers.Split(Regex(_TEKKEN_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]


# tokenizer.ggml.pre -> the splitting a byte-level vocabulary was trained with (llama.cpp's names).
# SmolLM2 and StarCoder cut every number character apart before the GPT-2 pattern, as their
# tokenizer.json and llama.cpp both do; transformers' GGUF loader ignores "smollm" and differs on
# characters like "½" or "²". A file without the key predates it: GPT-2's split, as in transformers.
_BYTE_LEVEL_SPLITS: dict[str, Callable[[], list[pre_tokenizers.PreTokenizer]]] = {
    "gpt-2": _gpt2_split,
    "smollm": _digits_then_gpt2_split,
    "starcoder": _digits_then_gpt2_split,
    "tekken": _tekken_split,
}
# Vocabularies made by tiktoken: a word that is itself a token is that token, whatever the merges
# say (llama.cpp's ignore_merges); mistral-common's Tekkenizer encodes with tiktoken.
_WHOLE_WORDS = {"tekken"}

# Special-token roles -> metadata keys holding their ids.
_SPECIAL_IDS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


def gguf_tokenizer_parts(file: GGUFFile) -> tuple[Tokenizer, dict[str, Any]]:
    """The `tokenizers.Tokenizer` and the MistralTokenizer keyword arguments a GGUF header describes."""
    md = file.metadata
    kind = md.get("tokenizer.ggml.model")
    builders = {"llama": _sentencepiece_bpe, "gpt2": _byte_level_bpe}
    if kind not in builders:
        raise TokenizerError(f"{file.path}: tokenizer.ggml.model {kind!r} is not supported; "
                             f"supported: {sorted(builders)}")
    tokens = _array(file, "tokenizer.ggml.tokens", str)
    types = (_array(file, "tokenizer.ggml.token_type", int, len(tokens))
             if "tokenizer.ggml.token_type" in md else [_NORMAL] * len(tokens))
    backend = builders[kind](file, tokens, types)
    specials = {role: _special(file, key, tokens) for role, key in _SPECIAL_IDS.items()}
    marked = [t for t, k in zip(tokens, types) if k in (_CONTROL, _UNKNOWN)]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in dict.fromkeys(marked + [t for t in specials.values() if t])])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, k in zip(tokens, types) if k == _USER_DEFINED])
    arch = md.get("general.architecture")
    kwargs = {
        **specials,
        # llama.cpp adds BOS for SentencePiece vocabularies unless told otherwise, never for byte-level ones.
        "add_bos_token": _flag(file, "tokenizer.ggml.add_bos_token", kind == "llama"),
        "add_eos_token": _flag(file, "tokenizer.ggml.add_eos_token", False),
        "chat_template": _optional_str(file, "tokenizer.chat_template"),
        "model_max_length": md.get(f"{arch}.context_length"),
    }
    return backend, kwargs


def _sentencepiece_bpe(file: GGUFFile, tokens: list[str], types: list[int]) -> Tokenizer:
    scores = _array(file, "tokenizer.ggml.scores", float, len(tokens))
    vocab = {token: i for i, token in enumerate(tokens)}
    normal = {t for t, k in zip(tokens, types) if k == _NORMAL}
    ranked = []  # (-score of the merged piece, its id, cut, left, right): best merge first
    for piece_id, (piece, score, kind) in enumerate(zip(tokens, scores, types)):
        if kind == _NORMAL:
            ranked += [(-score, piece_id, cut, piece[:cut], piece[cut:]) for cut in range(1, len(piece))
                       if piece[:cut] in normal and piece[cut:] in normal]
    ranked.sort()
    unk = _special(file, "tokenizer.ggml.unknown_token_id", tokens)
    backend = Tokenizer(models.BPE(vocab, [(left, right) for *_, left, right in ranked], unk_token=unk,
                                   fuse_unk=True, byte_fallback=True))
    # A normalizer, not the Metaspace pre-tokenizer: Metaspace skips the dummy prefix when the text
    # already starts with a space, SentencePiece and llama.cpp do not (" hi" -> "▁▁hi").
    spaces: list[normalizers.Normalizer] = [normalizers.Replace(" ", _SPACE)]
    steps: list[decoders.Decoder] = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if _flag(file, "tokenizer.ggml.add_space_prefix", True):  # the dummy prefix, dropped again on decode
        spaces.insert(0, normalizers.Prepend(_SPACE))
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.normalizer = normalizers.Sequence(spaces)
    backend.decoder = decoders.Sequence(steps)
    return backend


def _byte_level_bpe(file: GGUFFile, tokens: list[str], types: list[int]) -> Tokenizer:
    pre = file.metadata.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in _BYTE_LEVEL_SPLITS:
        raise TokenizerError(f"{file.path}: tokenizer.ggml.pre {pre!r} is not supported; "
                             f"supported: {sorted(_BYTE_LEVEL_SPLITS)}")
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = []
    for i, merge in enumerate(_array(file, "tokenizer.ggml.merges", str)):
        left, _, right = merge.partition(" ")
        if not (left and right and left in vocab and right in vocab and left + right in vocab):
            raise TokenizerError(f"{file.path}: merge {i} {merge!r} is not two tokens of the vocabulary "
                                 f"that join into a third")
        merges.append((left, right))
    backend = Tokenizer(models.BPE(vocab, merges, ignore_merges=pre in _WHOLE_WORDS))
    backend.pre_tokenizer = pre_tokenizers.Sequence(_BYTE_LEVEL_SPLITS[pre]())
    backend.decoder = decoders.ByteLevel()
    return backend


# --------------------------------------------------------------------------- typed metadata access
def _array(file: GGUFFile, key: str, kind: type, length: int | None = None) -> list[Any]:
    value = file.metadata.get(key)
    if kind is str:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    else:
        ok = isinstance(value, np.ndarray) and (value.dtype.kind in "iu" or (kind is float and value.dtype.kind == "f"))
    if not ok or (length is not None and len(value) != length) or len(value) == 0:
        want = f"{length} " if length is not None else "a non-empty array of "
        raise TokenizerError(f"{file.path}: metadata {key!r} must be {want}{kind.__name__} values")
    return value if kind is str else value.tolist()


def _special(file: GGUFFile, key: str, tokens: list[str]) -> str | None:
    token_id = file.metadata.get(key)
    if token_id is None:
        return None
    if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < len(tokens):
        raise TokenizerError(f"{file.path}: {key}={token_id!r} is not an id of the {len(tokens)}-token vocabulary")
    return tokens[token_id]


def _flag(file: GGUFFile, key: str, default: bool) -> bool:
    value = file.metadata.get(key, default)
    if not isinstance(value, bool):
        raise TokenizerError(f"{file.path}: metadata {key!r} must be a bool, got {value!r}")
    return value


def _optional_str(file: GGUFFile, key: str) -> str | None:
    value = file.metadata.get(key)
    if value is not None and not isinstance(value, str):
        raise TokenizerError(f"{file.path}: metadata {key!r} must be a string, got {type(value).__name__}")
    return value
