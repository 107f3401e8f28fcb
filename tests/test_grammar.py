"""Structured output (grammar.py): generations under json_object and JSON schemas parse and validate
against the schema (jsonschema is the independent validator), the masked logits are llguidance's
own mask, and bad `response_format`s raise typed errors naming the field."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mistral_lm import MistralForCausalLM, grammar, sampling
from mistral_lm.errors import GenerationError, MistralLMError
from mistral_lm.generation import Decoder, GenerationConfig, prefill
from mistral_lm.grammar import ResponseFormatError

from .conftest import default_model_or_skip, tiny_config

jsonschema = pytest.importorskip("jsonschema")

# Bounded schemas: every document has a bounded length, so a generation must end with EOS within
# the token budget whatever the model (each token carries at least one byte).
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "pets": {"type": "array", "maxItems": 3, "items": {"enum": ["cat", "dog", "fish"]}}},
    "required": ["name", "age", "pets"], "additionalProperties": False}
ORDER = {"type": "object", "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
    "type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{1,3}-[0-9]{1,3}$"},
                                     "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
    "required": ["sku", "qty"], "additionalProperties": False}}},
    "required": ["items"], "additionalProperties": False}
CHOICE = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"},
                                           "note": {"type": ["string", "null"], "maxLength": 5}},
          "required": ["color", "ok", "note"], "additionalProperties": False}
SCHEMAS = [PERSON, ORDER, CHOICE]
NO_HISTORY = torch.zeros(1, 0, dtype=torch.long)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: the tiny steps are dominated by thread hand-offs on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def smollm2():
    from mistral_lm.runtime import load_for_inference

    return load_for_inference(default_model_or_skip())


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return smollm2[1]


@pytest.fixture(scope="module")
def tiny(tokenizer):
    torch.manual_seed(0)
    return MistralForCausalLM(tiny_config(vocab_size=len(tokenizer))).eval()


def config(temperature: float | None) -> GenerationConfig:
    if temperature is None:
        return GenerationConfig(do_sample=False)
    return GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)


def generate(model, tokenizer, constraints, gen, seed, max_new, prompt="Reply in JSON."):
    """Each row (one per constraint) continues the same chat prompt; a row's tokens stop at EOS."""
    prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    b = len(constraints)
    ids = torch.tensor([prompt_ids] * b)
    cache = model.make_cache(b, max_length=ids.shape[1] + max_new)
    step, positions = Decoder(model), torch.full((b,), ids.shape[1])
    pick = grammar.constrained(sampling.make_picker(gen), constraints)
    generator = torch.Generator().manual_seed(seed)
    rows: list[list[int]] = [[] for _ in range(b)]
    with torch.no_grad():
        logits = prefill(model, cache, ids, torch.ones_like(ids), 512)
        for _ in range(max_new):
            tokens = pick(logits, torch.zeros(b, 0, dtype=torch.long), generator)
            for row, token in zip(rows, tokens.tolist()):
                if not row or row[-1] != tokenizer.eos_token_id:
                    row.append(token)
            if all(c.done for c in constraints):
                break
            logits, positions = step(tokens, positions, cache), positions + 1
    return rows


def check_documents(tokenizer, rows, schemas, budget_may_end=False):
    """Each row is a whole document that validates; with `budget_may_end` (an unbounded grammar like
    json_object), a row cut by the token budget (OpenAI's finish_reason "length") must instead be
    the start of a JSON document."""
    for row, schema in zip(rows, schemas):
        if row[-1] != tokenizer.eos_token_id and budget_may_end and schema is None:
            assert_json_prefix(tokenizer.decode(row))
            continue
        assert row[-1] == tokenizer.eos_token_id, f"no EOS within the budget: {tokenizer.decode(row)!r}"
        document = json.loads(tokenizer.decode(row[:-1]))
        jsonschema.validate(document, schema or {"type": "object"})


def assert_json_prefix(text):
    """Some closing of `text` parses (json.loads judges): open brackets closed, an open string or
    a dangling key or value finished first."""
    stack, in_string, escaped = [], False, False
    for ch in text:
        if in_string:
            escaped, in_string = (not escaped and ch == "\\"), in_string and (escaped or ch != '"')
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            stack.append("]" if ch == "[" else "}")
        elif ch in "]}":
            assert stack, f"not the start of a JSON document: {text!r}"
            stack.pop()
    closers = "".join(reversed(stack))
    if in_string:
        fillers = ['n"', 'n": 0'] if escaped else ['"', '": 0']  # a value, or a key
    else:
        fillers = ["", "0", '"": 0', ": 0", "null", "ull", "ll", "l", "rue", "ue", "e", "alse", "lse", "se"]
    assert any(_parses(text + f + closers) for f in fillers), f"not the start of a JSON document: {text!r}"


def _parses(text):
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


@pytest.mark.parametrize("temperature, seeds", [(None, [0]), (1.0, [0, 1, 2]), (1.5, [3, 4])])
def test_tiny_random_model_follows_schemas(tiny, tokenizer, temperature, seeds):
    """A random model's choices are noise: only the mask makes the output valid. One batch holds a
    row per schema, each with its own constraint."""
    for seed in seeds:
        constraints = [grammar.json_schema(tokenizer, s) for s in SCHEMAS]
        rows = generate(tiny, tokenizer, constraints, config(temperature), seed, max_new=200)
        check_documents(tokenizer, rows, SCHEMAS)


@pytest.mark.parametrize("temperature, seed", [(None, 0), (1.0, 0), (1.2, 1)])
def test_default_model_json_object_and_schema(smollm2, temperature, seed):
    """The embedded SmolLM2: a json_object row and two strict schema rows in one batch."""
    model, tokenizer = smollm2
    schemas = [None, PERSON, CHOICE]
    constraints = [grammar.response_format_constraint(tokenizer, {"type": "json_object"}),
                   *(grammar.response_format_constraint(tokenizer, {"type": "json_schema", "json_schema": {
                       "name": f"s{i}", "schema": s, "strict": True}}) for i, s in enumerate(schemas[1:]))]
    rows = generate(model, tokenizer, constraints, config(temperature), seed, max_new=48,
                    prompt="Describe a person (name, age, pets) as a JSON object.")
    check_documents(tokenizer, rows, schemas, budget_may_end=True)


@pytest.mark.parametrize("schema", [None, ORDER])
def test_masked_logits_are_the_engines_mask(tiny, tokenizer, schema):
    """Along a sampled trajectory: the finite logits are exactly the tokens llguidance's own byte mask
    allows, unchanged; and a token is allowed iff a copy of the matcher consumes it."""
    c = grammar.json_object(tokenizer) if schema is None else grammar.json_schema(tokenizer, schema)
    pick = grammar.constrained(sampling.make_picker(config(1.0)), [c])
    generator, rng = torch.Generator().manual_seed(5), np.random.default_rng(0)
    logits = torch.randn(1, len(tokenizer), generator=generator)
    for _ in range(12):
        masked = grammar.mask_logits(logits, [c])
        ours = torch.isfinite(masked[0]).numpy()
        engine = np.frombuffer(c._matcher.deep_copy().compute_logit_bias(), dtype=np.uint8)[: len(tokenizer)] > 0
        assert np.array_equal(ours, engine)
        assert torch.equal(masked[0][ours], logits[0][ours])
        for token in [*rng.choice(len(tokenizer), 48, replace=False), *rng.choice(np.flatnonzero(ours), 8)]:
            assert c._matcher.deep_copy().consume_token(int(token)) == bool(ours[token]), int(token)
        token = pick(logits, NO_HISTORY, generator)
        if c.done:
            break
        logits = torch.randn(1, len(tokenizer), generator=generator) * 4


def test_eos_is_forced_once_complete(tokenizer):
    c = grammar.json_schema(tokenizer, CHOICE)
    for token in tokenizer.encode('{"color": "red", "ok": true, "note": null}', add_special_tokens=False):
        assert c.allowed()[token]
        c.advance(token)
    assert c.complete
    assert np.flatnonzero(c.allowed()).tolist() == [tokenizer.eos_token_id]
    logits = torch.zeros(1, len(tokenizer) + 7)  # padded vocabulary: the extra columns are never allowed
    assert torch.isfinite(grammar.mask_logits(logits, [c])[0]).nonzero().flatten().tolist() == [tokenizer.eos_token_id]
    c.advance(tokenizer.eos_token_id)
    assert c.done
    assert torch.equal(grammar.mask_logits(logits, [c]), logits)  # done: no longer masked


def test_rows_are_independent_and_compiles_are_cached(tokenizer):
    a = grammar.json_schema(tokenizer, PERSON)
    b = grammar.json_schema(tokenizer, dict(reversed(PERSON.items())))  # same schema, other key order
    assert len([k for k in grammar._CACHE[tokenizer].grammars if "pets" in k]) == 1
    before = b.allowed()
    a.advance(tokenizer.encode('{"', add_special_tokens=False)[0])
    assert np.array_equal(b.allowed(), before) and not np.array_equal(a.allowed(), before)
    fork = a.fork()
    assert np.array_equal(fork.allowed(), a.allowed())
    free = torch.randn(3, len(tokenizer))
    masked = grammar.mask_logits(free, [a, None, b])
    assert torch.equal(masked[1], free[1])  # None: an unconstrained row
    with pytest.raises(GenerationError, match="constraints for a batch of 3"):
        grammar.constrained(lambda x, h, g: sampling.greedy(x), [a, b])(free, NO_HISTORY, None)
    with pytest.raises(GenerationError, match="not allowed"):
        grammar.json_schema(tokenizer, PERSON).advance(tokenizer.encode("}", add_special_tokens=False)[0])


def test_response_format_text_and_absent(tokenizer):
    assert grammar.response_format_constraint(tokenizer, None) is None
    assert grammar.response_format_constraint(tokenizer, {"type": "text"}) is None
    c = grammar.response_format_constraint(tokenizer, {"type": "json_schema", "json_schema": {
        "name": "p", "schema": PERSON, "description": "a person"}})
    assert c.name == "p" and c.description == "a person"


def _schema(schema, strict=None):
    spec = {"name": "x", "schema": schema}
    if strict is not None:
        spec["strict"] = strict
    return {"type": "json_schema", "json_schema": spec}


BAD = [
    ("nope", "response_format", "must be an object"),
    ({"type": "xml"}, "response_format.type", "unknown type"),
    ({}, "response_format.type", "unknown type"),
    ({"type": "json_object", "schema": {}}, "response_format.schema", "unknown field"),
    ({"type": "text", "json_schema": {}}, "response_format.json_schema", "unknown field"),
    ({"type": "json_schema"}, "response_format.json_schema", "required"),
    ({"type": "json_schema", "json_schema": {"schema": PERSON}}, "response_format.json_schema.name", "name"),
    ({"type": "json_schema", "json_schema": {"name": "a b", "schema": PERSON}}, "json_schema.name", "name"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "json_schema.schema", "required"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": PERSON, "strict": "yes"}}, "json_schema.strict",
     "true, false"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": PERSON, "extra": 1}}, "json_schema.extra",
     "unknown field"),
    (_schema([1]), "json_schema.schema", "JSON schema object"),
    (_schema(True), "json_schema.schema", "JSON schema object"),
    (_schema({"type": "foo"}), "json_schema.schema", "foo"),
    (_schema({"type": "object", "properties": []}), "json_schema.schema", "properties must be an object"),
    (_schema({"type": "object", "properties": {"a": 5}}), "json_schema.schema.properties.a", "object or a boolean"),
    (_schema({"type": "string", "pattern": "(["}), "json_schema.schema", "regex"),
    (_schema({"type": "integer", "minimum": 5, "maximum": 1}), "json_schema.schema", "minimum"),
    (_schema({"$ref": "#/$defs/missing"}), "json_schema.schema", "missing"),
    (_schema({"type": "string", "maxLenght": 3}), "json_schema.schema.maxLenght", "unknown JSON Schema keyword"),
    (_schema({"type": "string", "nullable": True}), "json_schema.schema.nullable", '"null"'),
    (_schema({"type": "object", "x-guidance": {"lenient": True}}), "schema.x-guidance", "engine options"),
    (_schema({"type": "array", "items": {"not": {"type": "string"}}}), "json_schema.schema", "not"),
    (_schema({"type": "array", "uniqueItems": True}), "json_schema.schema", "uniqueItems"),
    (_schema({"if": {"type": "string"}, "then": {"maxLength": 2}}), "json_schema.schema", "if"),
    (_schema({"oneOf": [{"type": "integer"}, {"type": "number", "minimum": 0}]}), "json_schema.schema", "oneOf"),
    (_schema({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}, strict=True),
     "json_schema.schema.additionalProperties", "additionalProperties"),
    (_schema({"type": "object", "properties": {"o": {"type": "object", "properties": {"b": {}},
                                                     "additionalProperties": False}},
              "required": ["o"], "additionalProperties": False}, strict=True),
     "json_schema.schema.properties.o.required", "required"),
    (_schema({"type": "object", "properties": 5, "additionalProperties": False}, strict=True), "json_schema.schema",
     "properties must be an object"),
    (_schema({"type": ["object", "null"], "properties": {}}, strict=True), "schema.additionalProperties",
     "additionalProperties"),
]


@pytest.mark.parametrize("response_format, param, message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_response_format_raises_a_typed_error_naming_the_field(tokenizer, response_format, param, message):
    with pytest.raises(ResponseFormatError, match=message) as info:
        grammar.response_format_constraint(tokenizer, response_format)
    assert info.value.param.endswith(param) and isinstance(info.value, (MistralLMError, ValueError))


def test_strict_false_enforces_the_same_schema(tokenizer):
    """strict only adds OpenAI's schema rules: an open schema is accepted without it, and still enforced."""
    open_schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    c = grammar.response_format_constraint(tokenizer, _schema(open_schema, strict=False))
    assert not c.allowed()[tokenizer.encode("[", add_special_tokens=False)[0]]


def test_openai_parse_schemas_compile_and_accept_pydantic_documents(tokenizer):
    """The strict schemas openai-python's `.parse()` sends for pydantic models compile (recursive
    $defs, enums, Literal, Optional, bounds), and pydantic's own valid documents pass the grammar."""
    pydantic = pytest.importorskip("pydantic")
    to_strict = pytest.importorskip("openai.lib._pydantic").to_strict_json_schema
    Literal, Optional = __import__("typing").Literal, __import__("typing").Optional  # noqa: N806

    class Node(pydantic.BaseModel):
        name: str
        children: list["Node"]

    class Person(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=20)
        age: int = pydantic.Field(ge=0, le=150)
        kind: Literal["a", "b"]
        zip: Optional[str]  # noqa: UP007 - the form pydantic users write
        tree: Node

    person = Person(name="Ada", age=36, kind="b", zip=None,
                    tree=Node(name="r", children=[Node(name="c", children=[])]))
    for model, instance in [(Person, person), (Node, person.tree)]:
        c = grammar.json_schema(tokenizer, to_strict(model), strict=True)
        for token in tokenizer.encode(json.dumps(instance.model_dump(mode="json")), add_special_tokens=False):
            assert c.allowed()[token]
            c.advance(token)
        assert c.complete


@pytest.mark.parametrize("file", ["tokenizer.model.v1", "mistral_instruct_tokenizer_240323.model.v3",
                                  "tekken_240911.json"])
def test_mistral_vocabularies_random_walks_parse(file):
    """SentencePiece (dummy-prefix "▁") and Tekken vocabularies: llguidance panicked on the v1 file
    when it was handed token bytes and an encode function instead of tokenizer.json. Any walk of
    allowed tokens ends in a document json.loads accepts and the schema validates."""
    import importlib.resources
    from pathlib import Path

    from mistral_lm.tokenizer import MistralTokenizer

    jsonschema = pytest.importorskip("jsonschema")
    tok = MistralTokenizer.from_pretrained(Path(str(importlib.resources.files("mistral_common") / "data")) / file)
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999},
                                               "ok": {"type": "boolean"}}, "required": ["n", "ok"],
              "additionalProperties": False}
    rng = np.random.default_rng(0)
    for c in [grammar.json_schema(tok, schema) for _ in range(3)]:
        ids = []
        while not c.done and len(ids) < 200:
            allowed = np.flatnonzero(c.allowed())
            token = int(rng.choice(allowed[allowed != tok.eos_token_id]) if not c.complete else tok.eos_token_id)
            c.advance(token)
            ids.append(token)
        assert c.done, tok.decode(ids)
        jsonschema.validate(json.loads(tok.decode(ids[:-1], skip_special_tokens=True)), schema)
