"""Structured output: constrained decoding to JSON (OpenAI's `response_format`) through llguidance.

A `Constraint` is one sequence's grammar state. Before the picker runs, every token the grammar
does not allow next gets logit -inf; after it, the chosen token advances the state; once the
grammar is complete only EOS is left. So greedy or sampled, the text parses and validates.

    >>> c = json_schema(tokenizer, {"type": "object", "properties": {"a": {"type": "integer"}}})  # doctest: +SKIP
    >>> pick = constrained(sampling.make_picker(config), [c])                                 # doctest: +SKIP

Why llguidance (bench/RESULTS.md, "Constrained decoding engines"): it refuses every JSON-schema
keyword it cannot enforce (xgrammar accepts `not`, `uniqueItems`, `if` and ignores them), compiles
a schema in under a millisecond (no per-schema pass over the vocabulary), has no Python
dependencies, and its per-token mask (~10 µs on 49k tokens) is negligible next to a decode step.

Layout: no whitespace besides ", " and ": " (as `json.dumps` writes), because a grammar that
allows any whitespace lets small models emit newlines forever. Schema keywords this module does
not know (a typo like `maxLenght`, OpenAPI's `nullable`) are refused here; keywords llguidance
knows but cannot enforce are refused by llguidance. Annotations (`title`, `description`, ...)
constrain nothing in JSON Schema itself and are accepted.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .errors import GenerationError
from .sampling import Picker

try:
    import llguidance
except ImportError:  # pragma: no cover - a core dependency; kept readable for broken installs
    llguidance = None

__all__ = ["Constraint", "ResponseFormatError", "constrained", "json_object", "json_schema", "lark",
           "response_format_constraint"]

LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CACHE_SIZE = 64  # compiled grammars kept per tokenizer (LRU)

# Every JSON Schema keyword, by where its value holds subschemas. The enforceable ones are checked
# by llguidance; `_check_keywords` refuses what is in none of these lists.
_SCHEMA = {"items", "additionalItems", "additionalProperties", "not", "if", "then", "else", "contains",
           "propertyNames", "unevaluatedItems", "unevaluatedProperties", "contentSchema"}
_SCHEMA_LIST = {"allOf", "anyOf", "oneOf", "prefixItems"}
_SCHEMA_MAP = {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}
_VALUES = {"type", "enum", "const", "multipleOf", "maximum", "exclusiveMaximum", "minimum", "exclusiveMinimum",
           "maxLength", "minLength", "pattern", "format", "maxItems", "minItems", "uniqueItems", "maxContains",
           "minContains", "maxProperties", "minProperties", "required", "dependentRequired", "dependencies",
           "$ref", "$dynamicRef", "$anchor", "$dynamicAnchor", "$recursiveRef", "$recursiveAnchor", "$id",
           "$schema", "$vocabulary", "$comment"}
_ANNOTATIONS = {"title", "description", "default", "examples", "deprecated", "readOnly", "writeOnly",
                "contentEncoding", "contentMediaType", "discriminator"}  # no effect on validity


class ResponseFormatError(GenerationError):
    """A `response_format` or its schema is invalid or asks for what cannot be enforced; `param` names
    the field (OpenAI's error `param`, e.g. "response_format.json_schema.schema")."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


class Constraint:
    """One sequence's grammar state: `allowed()` next tokens, `advance(token)`, `done` after EOS.

    Made by `json_object` / `json_schema` (each call a fresh state from a cached compile); `fork()`
    copies the current state, e.g. for the `n` choices of one request."""

    def __init__(self, matcher: Any, eos: int, vocab: int, name: str) -> None:
        self._matcher = matcher
        self.eos_token_id = eos
        self.vocab_size = vocab  # the tokenizer's; a model's extra logit columns are never allowed
        self.name = name  # "json_object", or the schema's name
        self.done = False  # EOS was consumed: nothing more is constrained
        self.description: str | None = None  # response_format's hint for the prompt (not a constraint)
        self._words = (vocab + 31) // 32
        self._bits = np.zeros(self._words, dtype=np.int32)

    def fork(self) -> Constraint:
        twin = Constraint(self._matcher.deep_copy(), self.eos_token_id, self.vocab_size, self.name)
        twin.done = self.done
        return twin

    @property
    def complete(self) -> bool:
        """The text so far is a whole document (EOS is allowed)."""
        return bool(self._matcher.is_accepting())

    def allowed(self) -> np.ndarray:
        """(vocab_size,) bool: the tokens the grammar allows next (only EOS once it is complete)."""
        if self._matcher.is_stopped() and not self._matcher.is_error():
            out = np.zeros(self.vocab_size, dtype=bool)  # complete, nothing can follow: force EOS
            out[self.eos_token_id] = True
            return out
        self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        self._raise_on_error()
        return np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: self.vocab_size].astype(bool)

    def advance(self, token: int) -> None:
        """Consume the chosen `token`; a token the grammar does not allow raises GenerationError."""
        if self.done:
            return
        if not self._matcher.consume_token(int(token)):
            raise GenerationError(f"token {int(token)} is not allowed by the {self.name} grammar here: "
                                  f"{self._matcher.get_error()}")
        self.done = int(token) == self.eos_token_id

    def _raise_on_error(self) -> None:
        if self._matcher.is_error():
            raise GenerationError(f"the {self.name} grammar failed: {self._matcher.get_error()}")


def constrained(pick: Picker, constraints: Constraint | Sequence[Constraint | None]) -> Picker:
    """`pick` with row b's disallowed tokens at -inf first, and row b's constraint advanced with the
    token picked after; `constraints[b]` None leaves row b free, and a done constraint (EOS read)
    no longer masks. Build it per step when rows come and go: it only wraps.

    `logits` (B, V) may have more columns than the tokenizer has tokens (padded vocabularies): those
    are never allowed."""
    rows = [constraints] if isinstance(constraints, Constraint) else list(constraints)

    def constrained_pick(logits: torch.Tensor, history: torch.Tensor,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        if logits.shape[0] != len(rows):
            raise GenerationError(f"{len(rows)} constraints for a batch of {logits.shape[0]} rows: give one per "
                                  f"row (None for an unconstrained row)")
        logits = mask_logits(logits, rows)
        tokens = pick(logits, history, generator)
        for row, token in zip(rows, tokens.tolist()):
            if row is not None:
                row.advance(token)
        return tokens

    return constrained_pick


def mask_logits(logits: torch.Tensor, constraints: Sequence[Constraint | None]) -> torch.Tensor:
    """`logits` (B, V) with each constrained row's disallowed tokens set to -inf (a new tensor)."""
    active = [(b, c) for b, c in enumerate(constraints) if c is not None and not c.done]
    if not active:
        return logits
    vocab = logits.shape[1]
    allowed = np.ones((len(constraints), vocab), dtype=bool)
    for b, c in active:
        if vocab < c.vocab_size:
            raise GenerationError(f"logits have {vocab} columns but the grammar's tokenizer has {c.vocab_size} "
                                  f"tokens: the model and tokenizer do not match")
        allowed[b, : c.vocab_size] = c.allowed()
        allowed[b, c.vocab_size:] = False
    keep = torch.from_numpy(allowed).to(logits.device)
    return logits.masked_fill(~keep, float("-inf"))


# ----- compiling ---------------------------------------------------------------------------------

class _Compiled:
    """Per tokenizer: llguidance's view of its vocabulary and an LRU of compiled grammars.

    llguidance reads the vocabulary as tokenizer.json (`backend_tokenizer`), so it knows how the
    tokenizer splits text itself: SentencePiece's dummy-prefix space included, which a bare list
    of token bytes plus an encode function does not convey (llguidance panics on it)."""

    def __init__(self, tokenizer: Any) -> None:
        self.key = _tokenizer_key(tokenizer)
        self.eos, self.vocab = self.key[0], self.key[1]
        self.lltok = llguidance.LLTokenizer(tokenizer.backend_tokenizer.to_str(), n_vocab=self.vocab,
                                            eos_token=self.eos)
        self.grammars: OrderedDict[str, Any] = OrderedDict()


_CACHE: weakref.WeakKeyDictionary[Any, _Compiled] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _tokenizer_key(tokenizer: Any) -> tuple[int, int, frozenset[int]]:
    return tokenizer.eos_token_id, len(tokenizer.token_table.raw), frozenset(tokenizer.all_special_ids)


def _compiled_for(tokenizer: Any) -> _Compiled:
    if llguidance is None:  # pragma: no cover
        raise GenerationError("structured output needs llguidance: pip install llguidance")
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise GenerationError("structured output needs the tokenizer's eos_token_id (the grammar ends on EOS); "
                              "set tokenizer.eos_token")
    entry = _CACHE.get(tokenizer)
    if entry is None or entry.key != _tokenizer_key(tokenizer):  # special tokens changed since: rebuild
        entry = _CACHE[tokenizer] = _Compiled(tokenizer)
    return entry


def _constraint(tokenizer: Any, schema: Mapping[str, Any] | str, name: str, param: str) -> Constraint:
    """A fresh state of `schema` (a JSON schema, or Lark source for `lark`) from the compile cache."""
    key = schema if isinstance(schema, str) else json.dumps(schema, sort_keys=True)
    with _LOCK:
        entry = _compiled_for(tokenizer)
        template = entry.grammars.get(key)
        if template is None:
            template = _compile(entry, schema, param)
            entry.grammars[key] = template
            if len(entry.grammars) > CACHE_SIZE:
                entry.grammars.popitem(last=False)
        entry.grammars.move_to_end(key)
        matcher = template.deep_copy()
    return Constraint(matcher, entry.eos, entry.vocab, name)


def _compile(entry: _Compiled, schema: Mapping[str, Any] | str, param: str) -> Any:
    try:
        if isinstance(schema, str):
            grammar = llguidance.LLMatcher.grammar_from_lark(schema)
        else:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(dict(schema), defaults=LAYOUT)
    except ValueError as err:
        raise ResponseFormatError(f"not a usable JSON schema ({err})", param) from None
    matcher = llguidance.LLMatcher(entry.lltok, grammar, log_level=0)
    if matcher.is_error():  # llguidance reports grammar errors (and keywords it cannot enforce) as a state
        raise ResponseFormatError(f"the schema cannot be enforced: {_first_line(matcher.get_error())}", param)
    return matcher


def _first_line(message: str) -> str:
    return " ".join(message.split())[:300]


def json_object(tokenizer: Any) -> Constraint:
    """Any JSON object (OpenAI's `{"type": "json_object"}`)."""
    return _constraint(tokenizer, {"type": "object"}, "json_object", "response_format")


def json_schema(tokenizer: Any, schema: Mapping[str, Any], *, strict: bool = False, name: str = "json_schema",
                param: str = "schema") -> Constraint:
    """A JSON document valid against `schema`, enforced in both modes; `strict=True` first applies
    OpenAI's strict-mode rules (every object lists all its properties in `required` and sets
    `additionalProperties: false`) and refuses a schema that breaks them, as OpenAI does.

    Raises ResponseFormatError naming the schema problem: malformed, a keyword unknown to JSON
    Schema, or one the engine cannot enforce (`not`, `if`/`then`, `uniqueItems`, `oneOf`, ...)."""
    if not isinstance(schema, Mapping):
        raise ResponseFormatError(f"must be a JSON schema object, got {type(schema).__name__}", param)
    _check_keywords(schema, param)
    constraint = _constraint(tokenizer, schema, name, param)  # a malformed schema fails here first
    if strict:
        _check_strict(schema, param)
    return constraint


def lark(tokenizer: Any, source: str, *, name: str = "grammar", param: str = "grammar") -> Constraint:
    """A constraint from llguidance Lark source (`%json {schema}` embeds a JSON schema; `<[id]>` is a
    control token by id), e.g. a tool call in a model's own format. Raises ResponseFormatError
    naming `param` when the grammar does not compile. Embedded schemas are not keyword-checked
    here: check them with `json_schema` first."""
    return _constraint(tokenizer, source, name, param)


def _subschemas(schema: Mapping[str, Any], path: str) -> list[tuple[Any, str]]:
    out: list[tuple[Any, str]] = []
    for key, value in schema.items():
        if key in _SCHEMA and isinstance(value, (Mapping, bool)):
            out.append((value, f"{path}.{key}"))
        elif key in _SCHEMA_LIST | {"items"} and isinstance(value, list):  # "items": [...] is draft-4 tuples
            out += [(v, f"{path}.{key}[{i}]") for i, v in enumerate(value)]
        elif key in _SCHEMA_MAP and isinstance(value, Mapping):
            out += [(v, f"{path}.{key}.{k}") for k, v in value.items()]
    return out


def _check_keywords(schema: Any, path: str) -> None:
    """Refuse keywords JSON Schema does not define (they would be silently ignored)."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, Mapping):
        raise ResponseFormatError(f"a schema must be an object or a boolean, got {json.dumps(schema)[:60]}", path)
    for key in schema:
        if key == "x-guidance":
            raise ResponseFormatError("engine options inside the schema are not accepted", f"{path}.{key}")
        known = key in _SCHEMA | _SCHEMA_LIST | _SCHEMA_MAP | _VALUES | _ANNOTATIONS or key.startswith("x-")
        if not known:
            hint = ' (for a nullable value use "type": [..., "null"])' if key == "nullable" else ""
            raise ResponseFormatError(f"unknown JSON Schema keyword {key!r}: it would be ignored, so it is "
                                      f"refused{hint}", f"{path}.{key}")
    for sub, sub_path in _subschemas(schema, path):
        _check_keywords(sub, sub_path)


def _check_strict(schema: Any, path: str) -> None:
    """OpenAI's strict mode: objects close (`additionalProperties: false`) and require every property."""
    if not isinstance(schema, Mapping):
        return
    kind = schema.get("type")
    if kind == "object" or (isinstance(kind, list) and "object" in kind) or "properties" in schema:
        if schema.get("additionalProperties") is not False:
            raise ResponseFormatError('strict mode needs "additionalProperties": false on every object (OpenAI\'s '
                                      'rule); set it, or send strict: false', f"{path}.additionalProperties")
        properties, required = schema.get("properties", {}), schema.get("required", [])
        if not isinstance(properties, Mapping) or not isinstance(required, list):
            return  # malformed: the compile names the problem
        missing = [k for k in properties if k not in required]
        if missing:
            raise ResponseFormatError(f"strict mode needs every property in \"required\" (OpenAI's rule); missing "
                                      f"{missing} (make a property optional with \"type\": [..., \"null\"])",
                                      f"{path}.required")
    for sub, sub_path in _subschemas(schema, path):
        _check_strict(sub, sub_path)


# ----- OpenAI's response_format ------------------------------------------------------------------

def response_format_constraint(tokenizer: Any, response_format: Mapping[str, Any] | None) -> Constraint | None:
    """The constraint OpenAI's `response_format` asks for: None for absent or `{"type": "text"}`,
    `json_object` for `{"type": "json_object"}`, `json_schema` for
    `{"type": "json_schema", "json_schema": {"name", "schema", "strict"?, "description"?}}`.

    Raises ResponseFormatError (a GenerationError, hence ValueError) with `param` naming the field.
    `description` is accepted as OpenAI documents it, a hint for the model: it is kept on the
    returned constraint (`.description`) for the caller to put in the prompt; it constrains nothing.
    """
    param = "response_format"
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise ResponseFormatError(f"must be an object, got {type(response_format).__name__}", param)
    kind = response_format.get("type")
    allowed = {"text": {"type"}, "json_object": {"type"}, "json_schema": {"type", "json_schema"}}
    if kind not in allowed:
        raise ResponseFormatError(f"unknown type {kind!r}; use one of {sorted(allowed)}", f"{param}.type")
    _no_extra(response_format, allowed[kind], param)
    if kind == "text":
        return None
    if kind == "json_object":
        return json_object(tokenizer)
    spec = response_format.get("json_schema")
    param = f"{param}.json_schema"
    if not isinstance(spec, Mapping):
        raise ResponseFormatError("required with type json_schema: an object with name and schema", param)
    _no_extra(spec, {"name", "schema", "strict", "description"}, param)
    name = spec.get("name")
    if not isinstance(name, str) or not 0 < len(name) <= 64 or not all(ch.isascii() and (ch.isalnum() or ch in "_-")
                                                                       for ch in name):
        raise ResponseFormatError("required: a name of 1-64 characters a-z, A-Z, 0-9, _ or -", f"{param}.name")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise ResponseFormatError(f"must be true, false or null, got {json.dumps(strict)}", f"{param}.strict")
    description = spec.get("description")
    if description is not None and not isinstance(description, str):
        raise ResponseFormatError("must be a string", f"{param}.description")
    if "schema" not in spec:
        raise ResponseFormatError("required: the JSON schema the reply must follow", f"{param}.schema")
    constraint = json_schema(tokenizer, spec["schema"], strict=bool(strict), name=name, param=f"{param}.schema")
    constraint.description = description
    return constraint


def _no_extra(obj: Mapping[str, Any], fields: set[str], param: str) -> None:
    extra = sorted(set(obj) - fields)
    if extra:
        raise ResponseFormatError(f"unknown field {extra[0]!r} (accepted: {sorted(fields)})", f"{param}.{extra[0]}")
