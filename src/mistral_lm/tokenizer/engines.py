"""Tokenizer engines: text -> ids, and the table that renders every id back to bytes.

An engine is anything with the `Engine` attributes. Three exist. `SentencePieceEngine` encodes
`.model` files with sentencepiece itself: the reference, so the ids are exact by construction, and
faster than `tokenizers` on this BPE, whose missing pre-tokenizer leaves the `tokenizers` word
cache unused (bench/bench_tokenizer.py). `TokenizersEngine` serves `tokenizer.json` folders and the
`tokenizers.Tokenizer` objects the GGUF reader builds (SentencePiece-style or GPT-2 byte-level).
`TekkenEngine` serves Mistral's `tekken.json` (tiktoken-style byte-level BPE) with tiktoken, as
mistral-common does. The facade reads only these attributes.

Decoding is not the engines' job: each gives a `TokenTable` (raw bytes per id), which
`StreamingDetokenizer` renders the same way whatever the engine.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import TokenizerError

if TYPE_CHECKING:
    import tokenizers

SPACE = "▁"  # SentencePiece's whitespace symbol (U+2581)
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@dataclass(frozen=True)
class TokenTable:
    """How every id renders, shared by `decode` and `StreamingDetokenizer`."""

    pieces: tuple[str, ...]  # vocabulary strings; special tokens render as these
    raw: tuple[bytes, ...]  # "▁" -> b" ", "<0xE2>" -> b"\xe2", GPT-2 byte-level chars -> their bytes
    dummy_prefix: frozenset[int]  # ids whose leading space is SentencePiece's dummy prefix when first
    errors: str  # codec error handler: per-byte (SentencePiece) or per-sequence (byte-level BPE)


class Engine(Protocol):
    """What the facade needs from an engine."""

    name: str  # shown in the tokenizer's repr
    pieces: list[str]  # every id's vocabulary string, added tokens included
    vocab_size: int  # the base vocabulary, without added tokens (as in Transformers)
    special: frozenset[int]  # control tokens: kept or skipped as a whole when decoding
    added: frozenset[int]  # tokens matched whole, outside the model's merges (special ones included)
    defaults: dict[str, str]  # "bos"/"eos"/"unk"/"pad" -> token string the model file names
    table: TokenTable

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Ids of plain texts: special-token strings inside them stay text."""

    def to_tokenizers(self) -> tokenizers.Tokenizer:
        """The engine as a `tokenizers.Tokenizer`, for writing tokenizer.json."""

    def model_files(self) -> dict[str, bytes]:
        """Files besides tokenizer.json that `save_pretrained` writes (name -> content)."""


def id_list(ids: Any, size: int) -> list[int]:
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


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2 byte-level BPE writes byte b as chr(b) when printable, else as chr(256 + k)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {b: chr(b) for b in printable}
    for k, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + k)
    return {c: b for b, c in chars.items()}


def token_table(pieces: list[str], literal: frozenset[int], *, strips: bool, byte_level: bool) -> TokenTable:
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
            raw.append(bytes([int(byte[1], 16)]) if byte else piece.replace(SPACE, " ").encode())
    prefix = frozenset(i for i, p in enumerate(pieces) if strips and i not in literal and p.startswith(SPACE))
    return TokenTable(tuple(pieces), tuple(raw), prefix, "replace" if byte_level else "mistral_lm.per_byte")


class SentencePieceEngine:
    """Encodes with sentencepiece itself (exact by construction)."""

    name = "sentencepiece"

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
        self.added = self.special
        self.defaults = {name: self.pieces[i] for name, i in
                         (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("unk", sp.unk_id()), ("pad", sp.pad_id()))
                         if i >= 0}
        # Probe sentencepiece's own decoder for the dummy-prefix rule instead of parsing the proto.
        probe = next((i for i, p in enumerate(self.pieces) if p[:1] == SPACE and p[1:2] not in ("", SPACE)
                      and i not in self.special), None)
        strips = probe is not None and not sp.decode([probe]).startswith(" ")
        self.table = token_table(self.pieces, self.special, strips=strips, byte_level=False)

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def model_files(self) -> dict[str, bytes]:
        return {"tokenizer.model": self.proto}

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
        backend.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
        backend.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(),
                                             decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        backend.add_special_tokens([AddedToken(self.pieces[i], special=True, normalized=False)
                                    for i in sorted(self.special)])
        return backend


class TokenizersEngine:
    """Encodes with a `tokenizers.Tokenizer` (tokenizer.json folders, GGUF files)."""

    name = "tokenizers"

    def __init__(self, backend: tokenizers.Tokenizer, *, private: bool = False) -> None:
        """`private`: the backend is this engine's alone (a loader built it), so no copy is made
        of it before its options change (a copy serializes and parses the whole vocabulary)."""
        from tokenizers import Tokenizer

        self.backend = backend if private else Tokenizer.from_str(backend.to_str())  # we change its options
        self.backend.encode_special_tokens = True  # special-token strings in text stay text
        self.backend.no_padding()
        self.backend.no_truncation()
        added = self.backend.get_added_tokens_decoder()  # id -> AddedToken
        size = self.backend.get_vocab_size(with_added_tokens=True)
        self.pieces = [self.backend.id_to_token(i) or "" for i in range(size)]
        self.vocab_size = self.backend.get_vocab_size(with_added_tokens=False)
        self.special = frozenset(i for i, t in added.items() if t.special)
        self.added = frozenset(added)
        self.defaults: dict[str, str] = {}
        decoder = self.backend.decoder  # its own JSON: the whole tokenizer's is megabytes
        byte_level, strips = _decoder_style(None if decoder is None else json.loads(decoder.__getstate__()))
        self.table = token_table(self.pieces, frozenset(added), strips=strips, byte_level=byte_level)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickling (copy.deepcopy, datasets.map workers) rebuilds the backend, which forgets
        `encode_special_tokens`: set it again, or special-token strings in text would become control tokens."""
        self.__dict__.update(state)
        self.backend.encode_special_tokens = True

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]

    def model_files(self) -> dict[str, bytes]:
        return {}

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


# mistral-common's `Tekkenizer.DEPRECATED_SPECIAL_TOKENS`: the control tokens of tekken files
# (versions up to v7) that carry no `special_tokens` list; the rest up to `num_special_tokens` are fillers.
_TEKKEN_DEFAULT_SPECIALS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                            "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]",
                            "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                            "[TOOL_CONTENT]")
TEKKEN_VERSIONS = ("v1", "v2", "v3", "v7", "v11", "v13", "v15")  # mistral-common's TokenizerVersion


def _tekken_field(data: Any, path: str, kind: type | tuple[type, ...], where: str) -> Any:
    """`data[a][b]` for path "a.b", checked to be of `kind`; TokenizerError naming the field otherwise."""
    value = data
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            raise TokenizerError(f"{where}: field {path!r} is missing")
        value = value[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise TokenizerError(f"{where}: field {path!r} has type {type(value).__name__}")
    return value


class TekkenEngine:
    """Encodes Mistral's `tekken.json` with tiktoken, as mistral-common's `Tekkenizer` does.

    Ids 0..num_special_tokens-1 are control tokens (the file's `special_tokens`, or mistral-common's
    default list for files up to v7, then "<SPECIAL_{i}>" fillers); regular tokens follow, offset by
    `num_special_tokens`. Only the first `default_vocab_size - default_num_special_tokens` vocab
    entries are used. Pieces are GPT-2 byte-level strings (unique, and what tokenizer.json uses).
    A special token's `is_control` flag is checked, but as in mistral-common every special id is a
    control token (kept or skipped alike when decoding).
    """

    name = "tekken"

    def __init__(self, content: bytes, where: str = "tekken.json") -> None:
        import tiktoken

        try:
            data = json.loads(content)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise TokenizerError(f"{where} is not valid JSON: {err}") from err
        self.content = content
        version = _tekken_field(data, "config.version", str, where)
        if version not in TEKKEN_VERSIONS:
            raise TokenizerError(f"{where}: field 'config.version' is {version!r}; supported: {list(TEKKEN_VERSIONS)}")
        pattern = _tekken_field(data, "config.pattern", str, where)
        size = _tekken_field(data, "config.default_vocab_size", int, where)
        num_special = _tekken_field(data, "config.default_num_special_tokens", int, where)
        vocab = _tekken_field(data, "vocab", list, where)
        inner = size - num_special
        if num_special < 3 or inner < 256:
            raise TokenizerError(f"{where}: fields 'config.default_vocab_size' ({size}) and "
                                 f"'config.default_num_special_tokens' ({num_special}) leave {inner} regular tokens")
        if len(vocab) < inner:
            raise TokenizerError(f"{where}: field 'vocab' has {len(vocab)} entries, fewer than "
                                 f"'config.default_vocab_size' - 'config.default_num_special_tokens' = {inner}")
        specials_given = data.get("special_tokens")
        if specials_given is None:
            if TEKKEN_VERSIONS.index(version) > TEKKEN_VERSIONS.index("v7"):
                raise TokenizerError(f"{where}: field 'special_tokens' is missing (required from version v11)")
            specials = list(_TEKKEN_DEFAULT_SPECIALS)
        else:
            if not isinstance(specials_given, list):
                raise TokenizerError(f"{where}: field 'special_tokens' has type {type(specials_given).__name__}")
            specials = []
            for k, token in enumerate(specials_given):
                text = _tekken_field({"t": token}, "t.token_str", str, f"{where} special_tokens[{k}]")
                if not isinstance(token.get("is_control", True), bool):  # informational: all are control ids
                    raise TokenizerError(f"{where}: field 'special_tokens[{k}].is_control' must be true or false, "
                                         f"got {token['is_control']!r}")
                if _tekken_field({"t": token}, "t.rank", int, f"{where} special_tokens[{k}]") != k:
                    raise TokenizerError(f"{where}: field 'special_tokens[{k}].rank' is {token['rank']}, expected {k}")
                specials.append(text)
        if len(specials) > num_special or len(set(specials)) != len(specials):
            raise TokenizerError(f"{where}: field 'special_tokens' has {len(specials)} entries "
                                 f"({len(set(specials))} distinct) for 'config.default_num_special_tokens' = "
                                 f"{num_special}")
        specials += [f"<SPECIAL_{i}>" for i in range(len(specials), num_special)]
        ranks: dict[bytes, int] = {}
        for i, entry in enumerate(vocab[:inner]):
            if not isinstance(entry, dict) or entry.get("rank") != i or not isinstance(entry.get("token_bytes"), str):
                raise TokenizerError(f"{where}: field 'vocab[{i}]' is not {{'rank': {i}, 'token_bytes': <base64>}}")
            try:
                token = base64.b64decode(entry["token_bytes"], validate=True)
            except ValueError as err:
                raise TokenizerError(f"{where}: field 'vocab[{i}].token_bytes' is not base64") from err
            if i < 256 and token != bytes([i]):
                raise TokenizerError(f"{where}: field 'vocab[{i}].token_bytes' ({token!r}) is not the byte {i}")
            if token in ranks:
                raise TokenizerError(f"{where}: field 'vocab[{i}].token_bytes' ({token!r}) is a duplicate of "
                                     f"vocab[{ranks[token] - num_special}]")
            ranks[token] = num_special + i  # tiktoken's ranks are the ids: offset, so no pass over its output
        try:
            self.tiktoken = tiktoken.Encoding(name=_encoding_name(where), pat_str=pattern, mergeable_ranks=ranks,
                                              special_tokens={})
        except ValueError as err:
            raise TokenizerError(f"{where}: field 'config.pattern' is not a valid pattern: {err}") from err
        self.version = version
        self.pattern = pattern
        self.num_special_tokens = num_special
        self.ranks = ranks
        alphabet = {b: c for c, b in _byte_level_alphabet().items()}
        by_rank = list(ranks)  # built in rank order
        self.pieces = specials + ["".join(alphabet[b] for b in token) for token in by_rank]
        self.vocab_size = size
        self.special = self.added = frozenset(range(num_special))
        self.defaults = {name: token for name, token in (("bos", "<s>"), ("eos", "</s>"), ("unk", "<unk>"),
                                                          ("pad", "<pad>")) if token in specials}
        self.table = TokenTable(tuple(self.pieces), tuple([t.encode() for t in specials] + by_rank), frozenset(),
                                "replace")

    def encode(self, texts: list[str]) -> list[list[int]]:
        encode = self.tiktoken.encode_ordinary  # per text: tiktoken's batch call pays a thread hand-off per text
        return [encode(text) for text in texts]

    def model_files(self) -> dict[str, bytes]:
        return {"tekken.json": self.content}

    def to_tokenizers(self) -> tokenizers.Tokenizer:
        """The same BPE as a byte-level `tokenizers.Tokenizer` (tokenizer.json for transformers).

        Merges are every split of a token into two tokens, ranked by the merged token's rank (then
        the parts'), which is tiktoken's lowest-rank-first merging; `ignore_merges` takes a whole
        pre-token that is in the vocabulary as one token, as tiktoken does.
        """
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

        ranks = self.ranks
        merges = sorted((rank, ranks[token[:k]], ranks[token[k:]], token[:k], token[k:])
                        for token, rank in ranks.items() if len(token) > 1
                        for k in range(1, len(token)) if token[:k] in ranks and token[k:] in ranks)
        pieces = self.pieces
        backend = Tokenizer(models.BPE({p: i for i, p in enumerate(pieces)},
                                       [(pieces[ranks[a]], pieces[ranks[b]]) for *_, a, b in merges],
                                       ignore_merges=True))
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(self.pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens([AddedToken(pieces[i], special=True, normalized=False)
                                    for i in sorted(self.special)])
        return backend


def _encoding_name(where: str) -> str:
    """A tiktoken encoding name from the file name."""
    return re.sub(r"\W", "_", where.rsplit("/", 1)[-1].removesuffix(".json")) or "tekken"
