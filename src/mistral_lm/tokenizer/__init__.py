"""Mistral's tokenizer (SentencePiece BPE with byte fallback) behind the Transformers call API.

The package splits by concern, with dependencies pointing one way (this facade -> the rest):

- `engines`: text -> ids (sentencepiece for `.model` files, `tokenizers` for tokenizer.json and
  GGUF vocabularies, tiktoken for Tekken's tekken.json) and the table that renders each id as bytes;
- `detokenizer`: ids -> text, one state machine for `decode` and streaming;
- `files`: folder, file and GGUF loading (GGUF through `checkpoints/`), `save_pretrained`;
- `chat_template`: pure, sandboxed rendering of messages into (text, is_special) pieces.

Special-token strings typed inside text ("<s>", "[INST]") stay text unless a caller opts in with
`split_special_tokens=False`: a prompt must not be able to inject control tokens.
"""

from __future__ import annotations

import contextvars
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import TokenizerError
from .chat_template import render_chat_spans
from .detokenizer import StreamingDetokenizer
from .engines import SPACE, Engine, SentencePieceEngine, TekkenEngine, TokenizersEngine, TokenTable, id_list
from .files import TOKEN_NAMES, file_kwargs, folder_config, read_file, save_folder
from .mistral_chat import encode_chat, parse_tool_calls, sentencepiece_chat_version, tekken_chat_version

if TYPE_CHECKING:
    import tokenizers

__all__ = ["BatchEncoding", "LlamaTokenizer", "LlamaTokenizerFast", "MistralTokenizer", "StreamingDetokenizer"]

_IGNORED_OPTIONS = frozenset({"use_fast", "trust_remote_code", "legacy"})  # HF options with no effect here
# The tokenizers.Tokenizer that from_pretrained built for the tokenizer it is constructing, which
# may then use it without a copy; a tokenizer_object passed by a caller is copied.
_loading: contextvars.ContextVar[Any] = contextvars.ContextVar("mistral_lm_tokenizer_loading", default=None)
_SETTINGS = frozenset({"bos_token", "eos_token", "unk_token", "pad_token", "add_bos_token", "add_eos_token",
                       "chat_template", "padding_side", "model_max_length"})
# Transformers options of apply_chat_template that tokenize differently; refused (when set) rather than passed
# to the template.
_CHAT_UNSUPPORTED = frozenset({"padding", "truncation", "max_length", "tokenizer_kwargs", "sanitize_control_tokens"})
_warned: set[str] = set()


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
        self._set_token(name, None if value is None else self._engine.pieces[id_list(value, len(self))[0]])

    return property(get, set, doc=f"Id of the {name} token (None when unset); settable.")


class MistralTokenizer:
    """Mistral's tokenizer with the Transformers API (`tok(texts, padding=True, return_tensors="pt")`).

    Build it with `from_pretrained(folder_or_file)` or from an engine: `sp_model_path` (a
    SentencePiece `.model`), `tekken_file` (Mistral's tiktoken-style `tekken.json`) or
    `tokenizer_object` (a `tokenizers.Tokenizer`, whose post-processor is ignored: BOS/EOS follow
    `add_bos_token`/`add_eos_token`). Padding is on the left by
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
                 sp_model_path: str | os.PathLike[str] | None = None,
                 tekken_file: str | os.PathLike[str] | None = None, bos_token: str | None = None,
                 eos_token: str | None = None, unk_token: str | None = None, pad_token: str | None = None,
                 add_bos_token: bool = True, add_eos_token: bool = False, chat_template: str | None = None,
                 padding_side: str = "left", model_max_length: int | None = None,
                 split_special_tokens: bool = True) -> None:
        if [tokenizer_object, sp_model_path, tekken_file].count(None) != 2:
            raise TokenizerError("pass exactly one of tokenizer_object= (a tokenizers.Tokenizer), "
                                 "sp_model_path= (a SentencePiece .model file) or tekken_file= (a tekken.json)")
        # mistral-common's chat version (v1/v2/v3/v7) of a Mistral tokenizer file, else None
        self._chat_version: str | None = None
        if tokenizer_object is not None:
            self._engine: Engine = TokenizersEngine(tokenizer_object, private=tokenizer_object is _loading.get())
        elif tekken_file is not None:
            self._engine = TekkenEngine(read_file(Path(str(tekken_file)), "Tekken file"), str(tekken_file))
            self._chat_version = tekken_chat_version(self._engine.version)
        else:
            self._engine = SentencePieceEngine(read_file(Path(str(sp_model_path)), "SentencePiece model"))
            self._chat_version = sentencepiece_chat_version(sp_model_path)
        self._vocab = {piece: i for i, piece in enumerate(self._engine.pieces)}
        given = {"bos": bos_token, "eos": eos_token, "unk": unk_token, "pad": pad_token}
        self._tokens: dict[str, str | None] = dict.fromkeys(TOKEN_NAMES)
        for name in TOKEN_NAMES:
            self._set_token(name, given[name] if given[name] is not None else self._engine.defaults.get(name))
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.chat_template = chat_template
        self.padding_side = padding_side
        self.model_max_length = model_max_length
        self.truncation_side = "right"
        # the default of `__call__(split_special_tokens=...)`; False (Transformers' default) for
        # trusted text only, e.g. trl's SFTTrainer, which appends the eos_token string to each text
        self.split_special_tokens = split_special_tokens
        self.clean_up_tokenization_spaces = False

    # ----- loading and saving -------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], **overrides: Any) -> MistralTokenizer:
        """Load a folder (tokenizer.model, tekken.json and/or tokenizer.json, tokenizer_config.json,
        special_tokens_map.json, chat_template.jinja), a `.model`/`.json` file, or a `.gguf` file.

        `overrides` are constructor keywords (e.g. `padding_side="right"`, `pad_token="</s>"`).
        A folder loads the first of tokenizer.model, tekken.json, tokenizer.json: the reference
        format (sentencepiece, mistral-common's Tekken) wins over its conversion.
        """
        for option in _IGNORED_OPTIONS & set(overrides):
            overrides.pop(option)
            if option not in _warned:
                _warned.add(option)
                warnings.warn(f"from_pretrained({option}=...) has no effect in mistral_lm", stacklevel=2)
        path = Path(path)
        if path.suffix == ".gguf":  # vocabulary and settings from the header; overrides are settings only
            unknown = set(overrides) - _SETTINGS
            if unknown:
                raise TypeError(f"from_pretrained() got unexpected keyword arguments {sorted(unknown)}")
            return _construct(cls, file_kwargs(path), overrides, merge=True)
        if path.is_file():
            return _construct(cls, file_kwargs(path), overrides)
        if not path.is_dir():
            raise TokenizerError(f"{str(path)!r} is neither a file nor a folder; mistral_lm never downloads: fetch "
                                 f"the model first (e.g. `huggingface-cli download <repo> --local-dir ./model`)")
        found = [f for f in (path / "tokenizer.model", path / "tekken.json", path / "tokenizer.json") if f.is_file()]
        if not found:
            raise TokenizerError(f"{str(path)!r} has no tokenizer.model (SentencePiece), tekken.json (Tekken) or "
                                 f"tokenizer.json (tokenizers) file; found: {sorted(p.name for p in path.iterdir())}")
        return _construct(cls, file_kwargs(found[0]) | folder_config(path), overrides, merge=True)

    def save_pretrained(self, folder: str | os.PathLike[str]) -> tuple[str, ...]:
        """Write tokenizer.model (SentencePiece engine), tokenizer.json and tokenizer_config.json.

        `from_pretrained` round-trips the folder, and `transformers.AutoTokenizer` loads it with
        the same ids.
        """
        settings = {**{f"{name}_token": self._tokens[name] for name in TOKEN_NAMES},
                    **{key: getattr(self, key) for key in _SETTINGS - {f"{n}_token" for n in TOKEN_NAMES}},
                    "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces}
        return save_folder(Path(folder), self._engine, settings)

    # ----- encoding ---------------------------------------------------------------------------

    def __call__(self, text: str | Sequence[str], *, padding: bool | str = False,
                 truncation: bool | str | None = None, max_length: int | None = None,
                 padding_side: str | None = None, return_tensors: str | None = None,
                 return_attention_mask: bool | None = None, add_special_tokens: bool = True,
                 split_special_tokens: bool | None = None) -> BatchEncoding:
        """Encode a text or a batch of texts.

        `split_special_tokens=True` (the default, unlike Transformers; None reads the tokenizer's
        `split_special_tokens` attribute) keeps special-token strings in the text as text, as
        sentencepiece does; pass False only for trusted text in which "<s>" etc. must become
        control tokens.
        """
        if split_special_tokens is None:
            split_special_tokens = self.split_special_tokens
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
        out = [pieces[i] for i in id_list(ids, len(pieces)) if not (skip_special_tokens and i in self._special_ids)]
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

    def get_added_vocab(self) -> dict[str, int]:
        """The tokens matched whole rather than built by the model's merges (control tokens and
        tokenizer.json's added tokens), as Transformers' `get_added_vocab`: token -> id."""
        return {self._engine.pieces[i]: i for i in sorted(self._engine.added)}

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
        return list(self._sorted_special_ids)

    @property
    def special_id_set(self) -> frozenset[int]:
        """`all_special_ids` as a set, built once per change of the special tokens."""
        return self._special_ids

    @property
    def all_special_tokens(self) -> list[str]:
        return [self._engine.pieces[i] for i in self.all_special_ids]

    def _set_token(self, name: str, token: str | None) -> None:
        if token is not None and token not in self._vocab:
            raise TokenizerError(f"{name}_token={token!r} is not in the vocabulary ({len(self._vocab)} tokens); use "
                                 f"an existing token, e.g. `tokenizer.pad_token = tokenizer.eos_token`")
        self._tokens[name] = token
        self._special_ids = self._engine.special | frozenset(self._vocab[t] for t in self._tokens.values()
                                                             if t is not None)
        self._sorted_special_ids = sorted(self._special_ids)

    @property
    def token_table(self) -> TokenTable:
        """How every id renders as bytes (what `StreamingDetokenizer` reads)."""
        return self._engine.table

    # ----- chat -------------------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], tokenize: bool = True,
                            add_generation_prompt: bool = False, return_tensors: str | None = None,
                            return_dict: bool = False, chat_template: str | None = None,
                            continue_final_message: bool | str = False, return_assistant_tokens_mask: bool = False,
                            **template_kwargs: Any) -> Any:
        """Render `messages` with the tokenizer's template (or the built-in Mistral one) and encode it.

        Returns the string with `tokenize=False`, else the ids: a list, a (1, T) tensor with
        `return_tensors`, or a `BatchEncoding` (input_ids, attention_mask) with `return_dict=True`.
        Message text is always encoded as text; only the template's own special tokens become
        control ids (see `chat_template.render_chat`).

        `continue_final_message=True` leaves the final message open (no end-of-turn or </s> after
        it) so that generation continues it, as in Transformers (a str names the field to continue);
        it excludes `add_generation_prompt`. `return_assistant_tokens_mask=True` (with
        `return_dict=True`) adds `assistant_masks`: 1 for the tokens the template writes inside
        `{% generation %}...{% endgeneration %}` blocks, Transformers' rule (what trl's
        `assistant_only_loss` trains on).

        A tokenizer loaded from a Mistral file (`*.model.v2/v3/v7`, a v3/v7 `tekken.json`) with no
        Jinja template encodes as mistral-common does, straight from messages to ids
        (`mistral_chat.encode_chat`), from v2 on (v1's format is the built-in template);
        `add_generation_prompt` changes nothing there (the ids end after [/INST]), and
        `tokenize=False` gives the decoded ids. `continue_final_message` there is mistral-common's
        (the final message must be an assistant message).

        >>> tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
        '<s>[INST] Hi [/INST]'
        """
        refused = sorted(k for k in _CHAT_UNSUPPORTED & set(template_kwargs) if template_kwargs[k] not in (None, False))
        if refused:
            raise TypeError(f"apply_chat_template() does not support {refused}; render with tokenize=False and "
                            "call the tokenizer for padding or truncation")
        for key in _CHAT_UNSUPPORTED & set(template_kwargs):
            template_kwargs.pop(key)
        if continue_final_message and add_generation_prompt:
            raise TokenizerError("continue_final_message and add_generation_prompt exclude each other: "
                                 "continue_final_message continues the final message, add_generation_prompt starts a "
                                 "new assistant message")
        if return_assistant_tokens_mask and not (tokenize and return_dict):
            raise TokenizerError("return_assistant_tokens_mask=True needs tokenize=True and return_dict=True")
        if return_assistant_tokens_mask and continue_final_message:
            raise TokenizerError("continue_final_message is not compatible with return_assistant_tokens_mask")
        # v1 keeps the built-in template: it is v1's format (tested equal to mistral-common), and its
        # stricter role checks (alternating turns) are existing behaviour.
        if self._chat_version not in (None, "v1") and chat_template is None and self.chat_template is None:
            given = sorted(k for k, v in template_kwargs.items() if v is not None and k != "tools")
            if given:
                raise TokenizerError(f"apply_chat_template(): {given} are not supported by the "
                                     f"mistral-common {self._chat_version} encoding (only tools=)")
            if return_assistant_tokens_mask:
                raise TokenizerError(f"return_assistant_tokens_mask needs a Jinja chat template with {{% generation %}} "
                                     f"blocks; this {self._chat_version} tokenizer encodes as mistral-common does, "
                                     "without one: set tokenizer.chat_template")
            if continue_final_message not in (False, True):
                raise TokenizerError(f"continue_final_message={continue_final_message!r}: the mistral-common "
                                     f"{self._chat_version} encoding continues the final message's content only "
                                     "(pass True)")
            ids = encode_chat(messages, self._chat_version, self._encode_text, self._special_id,
                              tools=template_kwargs.get("tools"), continue_final_message=continue_final_message)
            if not tokenize:
                return self.decode(ids)
            return self._chat_output(ids, return_tensors, return_dict)
        if (continue_final_message and self._chat_version == "v1" and chat_template is None
                and self.chat_template is None and messages and messages[-1].get("role") != "assistant"):
            raise TokenizerError("continue_final_message=True continues the final message, which must be an "
                                 "assistant message in Mistral's formats (mistral-common's rule)")
        pieces, spans = render_chat_spans(messages, chat_template or self.chat_template,
                                          special_tokens=self.all_special_tokens, variables=self.special_tokens_map,
                                          add_generation_prompt=add_generation_prompt,
                                          continue_final_message=continue_final_message, **template_kwargs)
        if not tokenize:
            return "".join(text for text, _ in pieces)
        if not return_assistant_tokens_mask:
            return self._chat_output(self._encode_pieces(pieces), return_tensors, return_dict)
        ids, starts, ends = self._encode_pieces_with_offsets(pieces)
        out = self._chat_output(ids, return_tensors, return_dict)
        mask = _overlap_mask(starts, ends, spans)
        out["assistant_masks"] = _as_tensors([mask], return_tensors) if return_tensors else mask
        return out

    @property
    def backend_tokenizer(self) -> Any:
        """The vocabulary as a `tokenizers.Tokenizer` (Transformers' fast-tokenizer attribute), for
        libraries that read tokenizer.json (the grammar engine); its ids equal this tokenizer's.
        Built on first use (a Tekken vocabulary's merges take a moment)."""
        if getattr(self, "_backend", None) is None:
            self._backend = self._engine.to_tokenizers()
        return self._backend

    def parse_tool_calls(self, ids: Sequence[int] | Any) -> tuple[str | None, list[dict[str, str]]]:
        """A generated reply split into its text and its tool calls, for Mistral formats that have a
        [TOOL_CALLS] control token: `(content or None, [{"id", "name", "arguments"}, ...])`, with
        `arguments` a JSON string and 9-character ids (made up when the model wrote none).

        The inverse of `apply_chat_template`'s assistant turn (see `mistral_chat.parse_tool_calls`);
        raises ToolCallError when the model's JSON is malformed or cut short.
        """
        tool_calls_id = self._vocab.get("[TOOL_CALLS]")
        if tool_calls_id is None or tool_calls_id not in self._engine.special:
            raise TokenizerError("this tokenizer has no [TOOL_CALLS] control token: its model does not call tools "
                                 "in a Mistral format")
        stop = {self.eos_token_id} if self.eos_token_id is not None else set()
        return parse_tool_calls(id_list(ids, len(self)), lambda part: self.decode(part, skip_special_tokens=True),
                                tool_calls_id, stop_ids=stop)

    def _chat_output(self, ids: list[int], return_tensors: str | None, return_dict: bool) -> Any:
        value = _as_tensors([ids], return_tensors) if return_tensors else ids
        if not return_dict:
            return value
        mask = _as_tensors([[1] * len(ids)], return_tensors) if return_tensors else [1] * len(ids)
        return BatchEncoding(input_ids=value, attention_mask=mask)

    def _encode_pieces(self, pieces: Sequence[tuple[str, bool]]) -> list[int]:
        """Ids of (text, is_special) pieces: a special piece is one control id, looked up rather than
        parsed from text; text pieces are encoded as plain text.

        The seam for chat formats that are not templates: an encoder that builds pieces (or ids)
        from messages itself, as mistral-common's v3/v7 do, replaces `render_chat` above and
        shares this step.
        """
        texts = iter(self._engine.encode([text for text, special in pieces if not special]))
        return [i for text, special in pieces for i in ([self._vocab[text]] if special else next(texts))]

    def _encode_pieces_with_offsets(self, pieces: Sequence[tuple[str, bool]]
                                    ) -> tuple[list[int], list[int], list[int]]:
        """`_encode_pieces`, with every token's start and end character offsets in the pieces joined
        (what Transformers' fast tokenizers call `offsets`)."""
        ids: list[int] = []
        starts: list[int] = []
        ends: list[int] = []
        texts = iter(self._engine.encode([text for text, special in pieces if not special]))
        position = 0
        for text, special in pieces:
            piece_ids = [self._vocab[text]] if special else next(texts)
            spans = [(0, len(text))] if special else self._token_offsets(text, piece_ids)
            ids += piece_ids
            starts += [position + start for start, _ in spans]
            ends += [position + end for _, end in spans]
            position += len(text)
        return ids, starts, ends

    def _token_offsets(self, text: str, ids: list[int]) -> list[tuple[int, int]]:
        """Character span of each token of `text` (encoded as plain text into `ids`), from the bytes
        each token renders (`token_table`); SentencePiece's dummy-prefix space maps to no character."""
        raw = self._engine.table.raw
        rendered = b"".join(raw[i] for i in ids)
        # SentencePiece renders a "▁" typed in the text as a space: compare with that spelling too
        for spelling in (text, text.replace(SPACE, " ")):
            encoded = spelling.encode()
            shift = next((k for k in (0, 1) if rendered == b" " * k + encoded), None)
            if shift is not None:
                break
        else:
            raise TokenizerError(f"return_assistant_tokens_mask: the tokens of {text[:60]!r} do not render back "
                                 "to it (normalized or unknown characters), so they cannot be aligned to the "
                                 "template's {% generation %} blocks")
        char_of = [k for k, char in enumerate(spelling) for _ in char.encode()] + [len(text)]  # byte -> character
        spans, byte = [], -shift
        for i in ids:
            start, byte = max(byte, 0), byte + len(raw[i])
            end = max(byte, 0)
            spans.append((char_of[start], char_of[end - 1] + 1) if end > start else (char_of[start],) * 2)
        return spans

    def _encode_text(self, text: str) -> list[int]:
        return self._engine.encode([text])[0]

    def _special_id(self, token: str) -> int:
        i = self._vocab.get(token)
        if i is None or i not in self._engine.special:
            raise TokenizerError(f"this {self._chat_version} tokenizer has no control token {token!r}")
        return i

    def __repr__(self) -> str:
        return (f"MistralTokenizer(engine={self._engine.name}, vocab={len(self)}, bos={self.bos_token!r}, "
                f"eos={self.eos_token!r}, pad={self.pad_token!r}, padding_side={self.padding_side!r})")


LlamaTokenizer = LlamaTokenizerFast = MistralTokenizer


def _overlap_mask(starts: list[int], ends: list[int], spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token whose characters overlap one of `spans` (Transformers' assistant-mask rule)."""
    return [int(any(end > lo and start < hi for lo, hi in spans)) for start, end in zip(starts, ends)]


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


def _construct(cls: type, built: dict[str, Any], overrides: dict[str, Any], merge: bool = False) -> Any:
    """cls(**built, **overrides) (`merge`: overrides replace keys of `built`) for from_pretrained,
    which built `built`'s tokenizer_object itself: that one object goes in without a copy."""
    token = _loading.set(built.get("tokenizer_object"))
    try:
        return cls(**(built | overrides)) if merge else cls(**built, **overrides)
    finally:
        _loading.reset(token)
