"""Ids -> text, one state machine for `decode` and for streaming, so the two agree by construction.

It follows sentencepiece: invalid UTF-8 becomes one U+FFFD per byte and only the first piece
loses its dummy-prefix space; special tokens are kept or skipped as in Transformers, and
Transformers' `clean_up_tokenization_spaces` rules apply on request.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable
from typing import Any, Protocol

from .engines import TokenTable, id_list


def _one_replacement_per_byte(err: UnicodeError) -> tuple[str, int]:
    """sentencepiece writes one U+FFFD per invalid byte; Python's "replace" merges a truncated sequence."""
    if not isinstance(err, UnicodeDecodeError):
        raise err
    return "\ufffd" * (err.end - err.start), err.end


codecs.register_error("mistral_lm.per_byte", _one_replacement_per_byte)  # TokenTable.errors of SentencePiece


class Vocabulary(Protocol):
    """What the detokenizer reads from a tokenizer: the id table and which ids are special tokens."""

    @property
    def token_table(self) -> TokenTable: ...

    @property
    def all_special_ids(self) -> list[int]: ...


def _clean_up_tokenization(text: str) -> str:
    """Transformers' `clean_up_tokenization_spaces`: drop the space before punctuation and contractions."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


def _clean_up_cut(text: str) -> int:
    """Where text can be split so that clean-up of the halves equals clean-up of the whole, whatever follows.

    A clean-up pattern (" .", " ' ", " n't", " 've", ...) can span a cut at a space only if the
    character before the cut may end a pattern's beginning (" ", "'", "n", "v", "r"); replacements
    only delete spaces, so that character stays put. Cut at the last space not preceded by one.
    """
    if " " not in text:
        return len(text)
    cut = text.rfind(" ")
    while cut > 0 and text[cut - 1] in " 'nvr":
        cut = text.rfind(" ", 0, cut)
    return max(cut, 0)


class StreamingDetokenizer:
    """Text for a growing id sequence: what `decode` of all ids gives, released as soon as it is final.

    A character split over byte-fallback pieces (<0xE2><0x82><0xAC>) appears once complete, and
    only the first piece loses its dummy-prefix space, so the concatenation of everything `add`
    and `finish` return equals `tokenizer.decode(all_ids)` (`decode` is built on this class).
    `tokenizer` is anything with a `token_table` and `all_special_ids` (a MistralTokenizer).

    >>> detok = StreamingDetokenizer(tok)
    >>> "".join(detok.add(i) for i in tok.encode("a €", add_special_tokens=False)) + detok.finish()
    'a €'
    """

    def __init__(self, tokenizer: Vocabulary, *, skip_special_tokens: bool = False,
                 clean_up_tokenization_spaces: bool = False) -> None:
        self._table = tokenizer.token_table
        # Tekken has 1000 special ids: a tokenizer's cached set (MistralTokenizer.special_id_set) saves
        # rebuilding it on every decode call.
        specials = getattr(tokenizer, "special_id_set", None)
        self._specials = specials if isinstance(specials, frozenset) else frozenset(tokenizer.all_special_ids)
        self._skip_special = skip_special_tokens
        self._clean_up = clean_up_tokenization_spaces
        self._reset()

    def _reset(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors=self._table.errors)
        self._first = True  # no piece rendered yet: the next one may lose its dummy-prefix space
        self._held = ""  # text kept back until clean-up of it is final

    def add(self, ids: int | Iterable[int] | Any) -> str:
        """Feed ids (an int, a list, an array or a tensor); return the text they completed."""
        raw = self._table.raw
        texts: list[str] = []
        chunks: list[bytes] = []
        for i in id_list(ids, len(raw)):
            if i in self._specials:
                if self._skip_special:  # still ends a byte sequence, as in sentencepiece
                    texts.append(self._utf8.decode(b"".join(chunks), final=True))
                    chunks = []
                    continue
                chunks.append(self._table.pieces[i].encode())
            elif self._first and i in self._table.dummy_prefix:
                chunks.append(raw[i][1:])
            else:
                chunks.append(raw[i])
            self._first = False
        texts.append(self._utf8.decode(b"".join(chunks)))
        return self._release("".join(texts), final=False)

    def finish(self) -> str:
        """Return the text still held back (an unfinished character becomes U+FFFD) and reset."""
        text = self._release(self._utf8.decode(b"", final=True), final=True)
        self._reset()
        return text

    def _release(self, text: str, final: bool) -> str:
        if not self._clean_up:
            return text
        text = self._held + text
        cut = len(text) if final else _clean_up_cut(text)
        self._held = text[cut:]
        return _clean_up_tokenization(text[:cut])
