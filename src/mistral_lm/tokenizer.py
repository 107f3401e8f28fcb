"""Mistral's tokenizer (SentencePiece BPE with byte fallback) behind the Transformers call API.

Engine, chosen by measurement (bench/bench_tokenizer.py, tests/test_tokenizer.py): `.model` files
are encoded by `sentencepiece` itself. It is the reference, so the ids are exact by construction,
and it encodes this BPE about twice as fast as `tokenizers` (no pre-tokenizer, so the `tokenizers`
word cache never hits). `tokenizers` serves folders that ship only a `tokenizer.json` and the
`tokenizers.Tokenizer` objects the GGUF loader builds (SentencePiece-style or GPT-2 byte-level).

Decoding is ours and the same for both engines: a table maps every id to its raw bytes, and one
state machine (`StreamingDetokenizer`) turns ids into text, so `decode` and streaming agree by
construction. It follows sentencepiece: invalid UTF-8 becomes one U+FFFD per byte and only the
first piece loses its dummy-prefix space; special tokens are kept or skipped as in Transformers.

Special-token strings typed inside text ("<s>", "[INST]") stay text unless a caller opts in with
`split_special_tokens=False`: a prompt must not be able to inject control tokens.
"""

from __future__ import annotations

import codecs
import json
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .chat_template import apply_chat_template
from .errors import TokenizerError

if TYPE_CHECKING:
    import tokenizers

_SPACE = "▁"  # SentencePiece's whitespace symbol (U+2581)
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_TOKEN_NAMES = ("bos", "eos", "unk", "pad")
_IGNORED_OPTIONS = frozenset({"use_fast", "trust_remote_code", "legacy"})  # HF options with no effect here
_SETTINGS = frozenset({"bos_token", "eos_token", "unk_token", "pad_token", "add_bos_token", "add_eos_token",
                       "chat_template", "padding_side", "model_max_length"})
_warned: set[str] = set()


def _one_replacement_per_byte(err: UnicodeError) -> tuple[str, int]:
    """sentencepiece writes one U+FFFD per invalid byte; Python's "replace" merges a truncated sequence."""
    if not isinstance(err, UnicodeDecodeError):
        raise err
    return "\ufffd" * (err.end - err.start), err.end


codecs.register_error("mistral_lm.per_byte", _one_replacement_per_byte)


class BatchEncoding(dict):
    """The dict `tokenizer(...)` returns, with attribute access (`.input_ids`) and `.to(device)`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchEncoding has no field {name!r}; fields: {sorted(self)}") from None

    def to(self, device: Any) -> BatchEncoding:
        """Move the torch tensors to `device` (in place, like Transformers) and return self."""
        import torch

        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                self[key] = value.to(device)
        return self


@dataclass(frozen=True)
class _TokenTable:
    """How every id renders, shared by `decode` and `StreamingDetokenizer`."""

    raw: tuple[bytes, ...]  # "▁" -> b" ", "<0xE2>" -> b"\xe2", GPT-2 byte-level chars -> their bytes
    dummy_prefix: frozenset[int]  # ids whose leading space is SentencePiece's dummy prefix when first
    errors: str  # codec error handler: per-byte (SentencePiece) or per-sequence (byte-level BPE)


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2 byte-level BPE writes byte b as chr(b) when printable, else as chr(256 + k)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {b: chr(b) for b in printable}
    for k, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + k)
    return {c: b for b, c in chars.items()}


def _token_table(pieces: list[str], literal: frozenset[int], *, strips: bool, byte_level: bool) -> _TokenTable:
    """The table of a vocabulary; `literal` ids (special and added tokens) render as their own string."""
    alphabet = _byte_level_alphabet() if byte_level else {}
    raw = []
    for i, piece in enumerate(pieces):
        byte = None if byte_level or i in literal else _BYTE_PIECE.fullmatch(piece)
        if i in literal:
            raw.append(piece.encode())
        elif byte_level:
            raw.append(b"".join(bytes([alphabet[c]]) if c in alphabet else c.encode() for c in piece))
        else:
            raw.append(bytes([int(byte[1], 16)]) if byte else piece.replace(_SPACE, " ").encode())
    prefix = frozenset(i for i, p in enumerate(pieces) if strips and i not in literal and p.startswith(_SPACE))
    return _TokenTable(tuple(raw), prefix, "replace" if byte_level else "mistral_lm.per_byte")


class _SentencePieceEngine:
    """Encodes with sentencepiece itself (exact by construction)."""

    def __init__(self, model_proto: bytes) -> None:
        import sentencepiece

        self.proto = model_proto
        try:
            self.sp = sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        except RuntimeError as err:
            raise TokenizerError(f"not a SentencePiece model file ({len(model_proto)} bytes): {err}") from err
        self.pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
        self.vocab_size = len(self.pieces)
        self.special = frozenset(i for i in range(self.vocab_size) if sp.is_control(i) or sp.is_unknown(i))
        self.defaults = {name: self.pieces[i] for name, i in
                         (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("unk", sp.unk_id()), ("pad", sp.pad_id()))
                         if i >= 0}
        # Probe sentencepiece's own decoder for the dummy-prefix rule instead of parsing the proto.
        probe = next((i for i, p in enumerate(self.pieces) if p[:1] == _SPACE and p[1:2] not in ("", _SPACE)
                      and i not in self.special), None)
        strips = probe is not None and not sp.decode([probe]).startswith(" ")
        self.table = _token_table(self.pieces, self.special, strips=strips, byte_level=False)

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def to_tokenizers(self) -> tokenizers.Tokenizer:
        """The official Mistral `tokenizer.json` layout, for tools that prefer that file (transformers).

        Merges are every split of a piece into two pieces, ranked like sentencepiece's priority:
        higher score first, ties (Mistral's whitespace-only pieces share one score) by piece id,
        which reproduces sentencepiece's leftmost-first merging of whitespace runs (tested). Known
        gap: user-defined symbols (v3+ "[REF]") become plain pieces, not atomic ones; our loader
        reads tokenizer.model first, so only tokenizer.json-only consumers see it.
        """
        from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

        sp, vocab = self.sp, {p: i for i, p in enumerate(self.pieces)}
        normal = {p: i for p, i in vocab.items() if i not in self.special and not sp.is_byte(i)}
        ranked = sorted((-sp.get_score(i), i, k, piece[:k], piece[k:]) for piece, i in normal.items()
                        for k in range(1, len(piece)) if piece[:k] in normal and piece[k:] in normal)
        backend = Tokenizer(models.BPE(vocab, [(left, right) for *_, left, right in ranked],
                                       unk_token=self.defaults.get("unk"), byte_fallback=True, fuse_unk=True))
        backend.normalizer = normalizers.Sequence([normalizers.Prepend(_SPACE), normalizers.Replace(" ", _SPACE)])
        backend.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(),
                                             decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        backend.add_special_tokens([AddedToken(self.pieces[i], special=True, normalized=False)
                                    for i in sorted(self.special)])
        return backend


class _TokenizersEngine:
    """Encodes with a `tokenizers.Tokenizer` (tokenizer.json folders, GGUF files)."""

    def __init__(self, backend: tokenizers.Tokenizer) -> None:
        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_str(backend.to_str())  # a private copy: we change its options
        self.backend.encode_special_tokens = True  # special-token strings in text stay text
        self.backend.no_padding()
        self.backend.no_truncation()
        spec = json.loads(self.backend.to_str())
        added = {t["id"]: t for t in spec.get("added_tokens", [])}
        size = self.backend.get_vocab_size(with_added_tokens=True)
        self.pieces = [self.backend.id_to_token(i) or "" for i in range(size)]
        self.vocab_size = self.backend.get_vocab_size(with_added_tokens=False)
        self.special = frozenset(i for i, t in added.items() if t.get("special"))
        self.defaults: dict[str, str] = {}
        byte_level, strips = _decoder_style(spec.get("decoder"))
        self.table = _token_table(self.pieces, frozenset(added), strips=strips, byte_level=byte_level)

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]

    def to_tokenizers(self) -> tokenizers.Tokenizer:
        from tokenizers import Tokenizer

        return Tokenizer.from_str(self.backend.to_str())


def _decoder_style(decoder: dict[str, Any] | None) -> tuple[bool, bool]:
    """(byte_level, strips_dummy_prefix) of a tokenizer.json decoder; the two kinds we render."""
    parts = (decoder or {}).get("decoders", [decoder]) if (decoder or {}).get("type") == "Sequence" else [decoder]
    types = {p.get("type") for p in parts if p}
    if "ByteLevel" in types:
        return True, False
    if types & {"ByteFallback", "Metaspace", "Replace"}:
        return False, any(
            (p.get("type") == "Strip" and p.get("start", 0) > 0)
            or (p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never"
                and p.get("add_prefix_space", True))
            for p in parts if p
        )
    raise TokenizerError(f"unsupported tokenizer decoder {sorted(map(str, types))}: expected a SentencePiece-style "
                         "decoder (Replace '▁', ByteFallback, Strip) or a GPT-2 ByteLevel decoder")


def _id_list(ids: Any, size: int) -> list[int]:
    """Ids from an int, a list, a numpy array or a torch tensor, checked to lie in 0..size-1."""
    ids = ids.tolist() if hasattr(ids, "tolist") else ids
    try:
        out = [ids] if isinstance(ids, int) else [int(i) for i in ids]
    except (TypeError, ValueError) as err:
        raise TokenizerError(f"expected a sequence of token ids (ints), got {str(ids)[:80]}") from err
    bad = next((i for i in out if not 0 <= i < size), None)
    if bad is not None:
        raise TokenizerError(f"token id {bad} is out of range: this vocabulary has ids 0..{size - 1}")
    return out


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

    >>> detok = StreamingDetokenizer(tok)
    >>> "".join(detok.add(i) for i in tok.encode("a €", add_special_tokens=False)) + detok.finish()
    'a €'
    """

    def __init__(self, tokenizer: MistralTokenizer, *, skip_special_tokens: bool = False,
                 clean_up_tokenization_spaces: bool = False) -> None:
        self._table = tokenizer._engine.table
        self._specials = {i: tokenizer._engine.pieces[i].encode() for i in tokenizer._special_ids}
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
        for i in _id_list(ids, len(raw)):
            if i in self._specials:
                if self._skip_special:  # still ends a byte sequence, as in sentencepiece
                    texts.append(self._utf8.decode(b"".join(chunks), final=True))
                    chunks = []
                    continue
                chunks.append(self._specials[i])
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


def _token_property(name: str) -> property:
    def get(self: MistralTokenizer) -> str | None:
        return self._tokens[name]

    def set(self: MistralTokenizer, value: str | None) -> None:
        self._set_token(name, value)

    return property(get, set, doc=f"The {name} token string (None when unset); settable.")


def _token_id_property(name: str) -> property:
    def get(self: MistralTokenizer) -> int | None:
        token = self._tokens[name]
        return None if token is None else self._vocab[token]

    def set(self: MistralTokenizer, value: int | None) -> None:
        self._set_token(name, None if value is None else self._engine.pieces[_id_list(value, len(self))[0]])

    return property(get, set, doc=f"Id of the {name} token (None when unset); settable.")


class MistralTokenizer:
    """Mistral's tokenizer with the Transformers API (`tok(texts, padding=True, return_tensors="pt")`).

    Build it with `from_pretrained(folder_or_file)` or from an engine: `sp_model_path` (a
    SentencePiece `.model`) or `tokenizer_object` (a `tokenizers.Tokenizer`, whose post-processor
    is ignored: BOS/EOS follow `add_bos_token`/`add_eos_token`). Padding is on the left by
    default, which is what decoder-only generation needs.

    >>> tok = MistralTokenizer.from_pretrained("path/to/Mistral-7B-v0.1")
    >>> tok(["Hello world"]).input_ids
    [[1, 22557, 1526]]
    """

    bos_token = _token_property("bos")
    eos_token = _token_property("eos")
    unk_token = _token_property("unk")
    pad_token = _token_property("pad")
    bos_token_id = _token_id_property("bos")
    eos_token_id = _token_id_property("eos")
    unk_token_id = _token_id_property("unk")
    pad_token_id = _token_id_property("pad")

    def __init__(self, *, tokenizer_object: tokenizers.Tokenizer | None = None,
                 sp_model_path: str | os.PathLike[str] | None = None, bos_token: str | None = None,
                 eos_token: str | None = None, unk_token: str | None = None, pad_token: str | None = None,
                 add_bos_token: bool = True, add_eos_token: bool = False, chat_template: str | None = None,
                 padding_side: str = "left", model_max_length: int | None = None) -> None:
        if (tokenizer_object is None) == (sp_model_path is None):
            raise TokenizerError("pass exactly one of tokenizer_object= (a tokenizers.Tokenizer) or "
                                 "sp_model_path= (a SentencePiece .model file)")
        if tokenizer_object is not None:
            self._engine: _SentencePieceEngine | _TokenizersEngine = _TokenizersEngine(tokenizer_object)
        else:
            self._engine = _SentencePieceEngine(_read_file(Path(str(sp_model_path)), "SentencePiece model"))
        self._vocab = {piece: i for i, piece in enumerate(self._engine.pieces)}
        given = {"bos": bos_token, "eos": eos_token, "unk": unk_token, "pad": pad_token}
        self._tokens: dict[str, str | None] = dict.fromkeys(_TOKEN_NAMES)
        for name in _TOKEN_NAMES:
            self._set_token(name, given[name] if given[name] is not None else self._engine.defaults.get(name))
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.chat_template = chat_template
        self.padding_side = padding_side
        self.model_max_length = model_max_length
        self.truncation_side = "right"
        self.clean_up_tokenization_spaces = False

    # ----- loading and saving -------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], **overrides: Any) -> MistralTokenizer:
        """Load a folder (tokenizer.model and/or tokenizer.json, tokenizer_config.json,
        special_tokens_map.json, chat_template.jinja), a `.model`/`.json` file, or a `.gguf` file.

        `overrides` are constructor keywords (e.g. `padding_side="right"`, `pad_token="</s>"`).
        A folder with both files loads `tokenizer.model`: sentencepiece is the reference.
        """
        for option in _IGNORED_OPTIONS & set(overrides):
            overrides.pop(option)
            if option not in _warned:
                _warned.add(option)
                warnings.warn(f"from_pretrained({option}=...) has no effect in mistral_lm", stacklevel=2)
        path = Path(path)
        if path.suffix == ".gguf":
            from .checkpoints.gguf import load_gguf_tokenizer

            tokenizer = load_gguf_tokenizer(path)
            unknown = set(overrides) - _SETTINGS
            if unknown:
                raise TypeError(f"from_pretrained() got unexpected keyword arguments {sorted(unknown)}")
            for key, value in overrides.items():
                setattr(tokenizer, key, value)
            return tokenizer
        if path.is_file():
            engine = _engine_kwargs(path)
            return cls(**engine, **overrides)
        if not path.is_dir():
            raise TokenizerError(f"{str(path)!r} is neither a file nor a folder; mistral_lm never downloads: fetch "
                                 f"the model first (e.g. `huggingface-cli download <repo> --local-dir ./model`)")
        model, backend = path / "tokenizer.model", path / "tokenizer.json"
        if not model.is_file() and not backend.is_file():
            raise TokenizerError(f"{str(path)!r} has no tokenizer.model (SentencePiece) or tokenizer.json "
                                 f"(tokenizers) file; found: {sorted(p.name for p in path.iterdir())}")
        kwargs = _engine_kwargs(model if model.is_file() else backend) | _folder_config(path)
        return cls(**(kwargs | overrides))

    def save_pretrained(self, folder: str | os.PathLike[str]) -> tuple[str, ...]:
        """Write tokenizer.model (SentencePiece engine), tokenizer.json and tokenizer_config.json.

        `from_pretrained` round-trips the folder, and `transformers.AutoTokenizer` loads it with
        the same ids: the config names the generic fast class (transformers' LlamaTokenizer
        would rebuild the pipeline and change leading spaces) and `split_special_tokens`.
        """
        from tokenizers import processors

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        if isinstance(self._engine, _SentencePieceEngine):
            (folder / "tokenizer.model").write_bytes(self._engine.proto)
            written.append(folder / "tokenizer.model")
        backend = self._engine.to_tokenizers()
        bos = [self.bos_token] if self.add_bos_token and self.bos_token else []
        eos = [self.eos_token] if self.add_eos_token and self.eos_token else []
        if bos or eos:
            template = " ".join([*bos, "$A", *eos])
            backend.post_processor = processors.TemplateProcessing(
                single=template, pair=f"{template} {template.replace('$A', '$B')}",
                special_tokens=[(t, self._vocab[t]) for t in {*bos, *eos}])
        backend.save(str(folder / "tokenizer.json"))
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **{f"{name}_token": self._tokens[name] for name in _TOKEN_NAMES},
            "add_bos_token": self.add_bos_token, "add_eos_token": self.add_eos_token,
            "padding_side": self.padding_side, "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
            "split_special_tokens": True,
        }
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        written += [folder / "tokenizer.json", folder / "tokenizer_config.json"]
        return tuple(str(p) for p in written)

    # ----- encoding ---------------------------------------------------------------------------

    def __call__(self, text: str | Sequence[str], *, padding: bool | str = False,
                 truncation: bool | str | None = None, max_length: int | None = None,
                 padding_side: str | None = None, return_tensors: str | None = None,
                 return_attention_mask: bool | None = None, add_special_tokens: bool = True,
                 split_special_tokens: bool = True) -> BatchEncoding:
        """Encode a text or a batch of texts.

        `split_special_tokens=True` (the default, unlike Transformers) keeps special-token strings
        in the text as text, as sentencepiece does; pass False only for trusted text in which
        "<s>" etc. must become control tokens.
        """
        batched = not isinstance(text, str)
        texts: list[str] = [text] if isinstance(text, str) else list(text)
        bad = next((t for t in texts if not isinstance(t, str)), None)
        if bad is not None:
            raise TokenizerError(f"text must be a str or a list of str, got an item of type {type(bad).__name__}")
        limit = self._truncation_limit(truncation, max_length)
        rows = self._add_special_tokens(self._encode_texts(texts, split_special_tokens), add_special_tokens, limit)
        rows, masks = self._pad(rows, padding, max_length, padding_side or self.padding_side)
        out = BatchEncoding(input_ids=rows)
        if return_attention_mask is not False:
            out["attention_mask"] = masks
        for key, value in out.items():
            out[key] = _as_tensors(value, return_tensors) if return_tensors else value if batched else value[0]
        return out

    def encode(self, text: str, add_special_tokens: bool = True, **kwargs: Any) -> list[int] | Any:
        """Ids of one text (a (1, T) tensor with `return_tensors`); keywords as in `__call__`."""
        return self(text, add_special_tokens=add_special_tokens, **kwargs)["input_ids"]

    def _encode_texts(self, texts: list[str], split_special_tokens: bool) -> list[list[int]]:
        if split_special_tokens:
            return self._engine.encode(texts)
        # Opt-in: special-token strings become their ids; the text between them is encoded as
        # separate texts (each with its dummy prefix), as Transformers does.
        pattern = re.compile("(" + "|".join(map(re.escape, sorted(self.all_special_tokens, key=len, reverse=True)))
                             + ")")
        rows = []
        for text in texts:
            parts = pattern.split(text)
            encoded = iter(self._engine.encode([p for p in parts[0::2] if p]))
            rows.append([i for k, part in enumerate(parts) if part
                         for i in ([self._vocab[part]] if k % 2 else next(encoded))])
        return rows

    def _truncation_limit(self, truncation: bool | str | None, max_length: int | None) -> int | None:
        if truncation in (None, False, "do_not_truncate"):
            return None
        if truncation not in (True, "longest_first", "only_first"):
            raise TokenizerError(f"truncation={truncation!r} is not supported; use True or False")
        limit = max_length if max_length is not None else self.model_max_length
        if limit is None:
            raise TokenizerError("truncation=True needs max_length=... (this tokenizer has no model_max_length)")
        return limit

    def _add_special_tokens(self, rows: list[list[int]], add: bool, limit: int | None) -> list[list[int]]:
        before = [self.bos_token_id] if add and self.add_bos_token and self.bos_token is not None else []
        after = [self.eos_token_id] if add and self.add_eos_token and self.eos_token is not None else []
        if limit is not None:  # truncate the text, keep the special tokens (as Transformers does)
            keep = max(limit - len(before) - len(after), 0)
            rows = [ids[:keep] if self.truncation_side == "right" else ids[len(ids) - keep:] for ids in rows]
        return [before + ids + after for ids in rows] if before or after else rows  # type: ignore[operator]

    def _pad(self, rows: list[list[int]], padding: bool | str, max_length: int | None,
             side: str) -> tuple[list[list[int]], list[list[int]]]:
        if padding in (False, None, "do_not_pad"):
            return rows, [[1] * len(r) for r in rows]
        if padding in (True, "longest"):
            target = max(map(len, rows), default=0)
        elif padding == "max_length":
            if max_length is None:
                raise TokenizerError('padding="max_length" needs max_length=...; or use padding=True (longest)')
            target = max_length
        else:
            raise TokenizerError(f"padding={padding!r} is not supported; use True, 'longest', 'max_length' or False")
        if side not in ("left", "right"):
            raise TokenizerError(f"padding_side must be 'left' or 'right', got {side!r}")
        pad = self.pad_token_id
        if pad is None:
            raise TokenizerError("cannot pad: this tokenizer has no pad token (Mistral ships none). Set one, e.g. "
                                 "`tokenizer.pad_token = tokenizer.eos_token`, or call with padding=False")
        padded, masks = [], []
        for row in rows:
            fill = max(target - len(row), 0)
            padded.append([pad] * fill + row if side == "left" else row + [pad] * fill)
            masks.append([0] * fill + [1] * len(row) if side == "left" else [1] * len(row) + [0] * fill)
        return padded, masks

    # ----- decoding ---------------------------------------------------------------------------

    def decode(self, token_ids: int | Sequence[int] | Any, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        """Text of the ids (a list, array or 1-D tensor); out-of-range ids raise TokenizerError."""
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        detok = StreamingDetokenizer(self, skip_special_tokens=skip_special_tokens,
                                     clean_up_tokenization_spaces=clean_up_tokenization_spaces)
        return detok.add(token_ids) + detok.finish()

    def batch_decode(self, sequences: Sequence[Sequence[int]] | Any, skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: bool | None = None) -> list[str]:
        """`decode` of every row (a list of lists or a 2-D array/tensor)."""
        rows = sequences.tolist() if hasattr(sequences, "tolist") else sequences
        return [self.decode(row, skip_special_tokens, clean_up_tokenization_spaces) for row in rows]

    def convert_ids_to_tokens(self, ids: int | Sequence[int], skip_special_tokens: bool = False) -> str | list[str]:
        """Vocabulary pieces of ids (SentencePiece pieces keep their "▁")."""
        pieces = self._engine.pieces
        out = [pieces[i] for i in _id_list(ids, len(pieces)) if not (skip_special_tokens and i in self._special_ids)]
        return out[0] if isinstance(ids, int) else out

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int | None] | None:
        """Ids of pieces; an unknown piece maps to the unk id (None without one), as in Transformers."""
        lookup = [self._vocab.get(t, self.unk_token_id) for t in ([tokens] if isinstance(tokens, str) else tokens)]
        return lookup[0] if isinstance(tokens, str) else lookup

    # ----- vocabulary and special tokens -------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary (without added tokens), as in Transformers."""
        return self._engine.vocab_size

    def __len__(self) -> int:
        return len(self._engine.pieces)

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab)

    @property
    def padding_side(self) -> str:
        return self._padding_side

    @padding_side.setter
    def padding_side(self, side: str) -> None:
        if side not in ("left", "right"):
            raise TokenizerError(f"padding_side must be 'left' or 'right', got {side!r}")
        self._padding_side = side

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return {f"{name}_token": token for name, token in self._tokens.items() if token is not None}

    @property
    def all_special_ids(self) -> list[int]:
        return sorted(self._special_ids)

    @property
    def all_special_tokens(self) -> list[str]:
        return [self._engine.pieces[i] for i in self.all_special_ids]

    def _set_token(self, name: str, token: str | None) -> None:
        if token is not None and token not in self._vocab:
            raise TokenizerError(f"{name}_token={token!r} is not in the vocabulary ({len(self._vocab)} tokens); use "
                                 f"an existing token, e.g. `tokenizer.pad_token = tokenizer.eos_token`")
        self._tokens[name] = token
        self._special_ids = self._engine.special | {self._vocab[t] for t in self._tokens.values() if t is not None}

    apply_chat_template = apply_chat_template  # defined in chat_template.py, where the template logic lives

    def __repr__(self) -> str:
        engine = "sentencepiece" if isinstance(self._engine, _SentencePieceEngine) else "tokenizers"
        return (f"MistralTokenizer(engine={engine}, vocab={len(self)}, bos={self.bos_token!r}, "
                f"eos={self.eos_token!r}, pad={self.pad_token!r}, padding_side={self.padding_side!r})")


LlamaTokenizer = LlamaTokenizerFast = MistralTokenizer


def _read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise TokenizerError(f"cannot read the {what} {str(path)!r}: {err.strerror}") from err


def _engine_kwargs(path: Path) -> dict[str, Any]:
    """Constructor keywords for a tokenizer file: a tokenizer.json, else a SentencePiece model."""
    if path.suffix != ".json":
        return {"sp_model_path": path}
    from tokenizers import Tokenizer

    try:
        return {"tokenizer_object": Tokenizer.from_str(_read_file(path, "tokenizer file").decode())}
    except Exception as err:  # tokenizers raises its own Exception type on malformed files
        raise TokenizerError(f"{str(path)!r} is not a valid tokenizer.json: {err}") from err


def _folder_config(folder: Path) -> dict[str, Any]:
    """Constructor keywords from tokenizer_config.json, special_tokens_map.json, chat_template.jinja."""
    def load(name: str) -> dict[str, Any]:
        file = folder / name
        try:
            return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
        except json.JSONDecodeError as err:
            raise TokenizerError(f"{str(file)!r} is not valid JSON: {err}") from err

    config, special_map = load("tokenizer_config.json"), load("special_tokens_map.json")
    kwargs: dict[str, Any] = {}
    for name in _TOKEN_NAMES:
        token = config.get(f"{name}_token", special_map.get(f"{name}_token"))
        if isinstance(token, dict):  # serialized AddedToken
            token = token.get("content")
        if token is not None:
            kwargs[f"{name}_token"] = token
    for key in ("add_bos_token", "add_eos_token", "padding_side", "model_max_length"):
        if config.get(key) is not None:
            kwargs[key] = config[key]
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: Transformers uses "default"
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if template is not None:
        kwargs["chat_template"] = template
    return kwargs


def _as_tensors(rows: list[list[int]], kind: str) -> Any:
    """Rows as a (B, T) tensor of the requested framework."""
    if len({len(r) for r in rows}) > 1:
        raise TokenizerError(f"cannot make one tensor from sequences of lengths {sorted({len(r) for r in rows})}; "
                             "pass padding=True (and set a pad token) or return_tensors=None")
    if kind == "pt":
        import torch

        return torch.tensor(rows, dtype=torch.long)
    if kind == "np":
        import numpy as np

        return np.array(rows, dtype=np.int64).reshape(len(rows), -1)
    if kind == "jax":
        try:
            import jax.numpy as jnp
        except ImportError as err:
            raise TokenizerError('return_tensors="jax" needs jax: pip install "mistral_lm[flax]"') from err
        return jnp.array(rows, dtype=jnp.int32).reshape(len(rows), -1)
    raise TokenizerError(f"return_tensors={kind!r} is not supported; use 'pt', 'np', 'jax' or None")
