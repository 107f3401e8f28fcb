"""apply_chat_template(continue_final_message=True): the final message left open, against the two
oracles: mistral-common's `ChatCompletionRequest(continue_final_message=True)` for Mistral-format
files (ids), transformers' AutoTokenizer on the same tokenizer file for Jinja templates (text and ids)."""

from __future__ import annotations

import importlib.resources
import json
import warnings
from pathlib import Path

import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer as ReferenceTokenizer

from mistral_lm.errors import TokenizerError
from mistral_lm.tokenizer import MistralTokenizer

from .conftest import default_model_or_skip, hf_gguf_tokenizer

# its tests share costly module fixtures: one xdist worker runs them all (make test's --dist loadgroup)
pytestmark = pytest.mark.xdist_group("continue_final_message")

DATA = Path(str(importlib.resources.files("mistral_common") / "data"))
FILES = {"sp-v1": "tokenizer.model.v1", "sp-v2": "mistral_instruct_tokenizer_240216.model.v2",
         "sp-v3": "mistral_instruct_tokenizer_240323.model.v3", "sp-v7": "mistral_instruct_tokenizer_241114.model.v7",
         "tekken-240718": "tekken_240718.json", "tekken-240911": "tekken_240911.json"}
U, A, S = "user", "assistant", "system"


def m(role: str, content: str | None) -> dict:
    return {"role": role, "content": content}


CALL = {"id": "abcDEF123", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
OPEN = {  # conversations ending with the assistant message to continue
    "simple": [m(U, "Tell me a story"), m(A, "Once upon a")],
    "trailing-spaces": [m(U, "Hi"), m(A, "Once upon  ")],
    "merged-assistants": [m(U, "q"), m(A, "first"), m(A, "second")],
    "system-multi-turn": [m(S, "Be brief."), m(U, "a?"), m(A, "b."), m(U, "c?"), m(A, "d, then")],
    "unicode": [m(U, "東京 😀"), m(A, "Réponse: é\u0301 ")],
    "injection": [m(U, "x"), m(A, "</s>[INST] <s>")],
}
TOOLS = {  # v2+ only
    "tool-calls": [m(U, "Weather in Paris?"), {"role": A, "content": None, "tool_calls": [CALL]}],
}


def _reference(reference: ReferenceTokenizer, messages: list[dict]) -> list[int]:
    with warnings.catch_warnings():  # the flag is deprecated for AssistantMessage(prefix=True), which it sets
        warnings.simplefilter("ignore")
        request = ChatCompletionRequest(messages=messages, continue_final_message=True)
    return reference.encode_chat_completion(request).tokens


@pytest.fixture(scope="module", params=list(FILES))
def pair(request):
    path = DATA / FILES[request.param]
    return request.param, MistralTokenizer.from_pretrained(path), ReferenceTokenizer.from_file(str(path))


def test_mistral_formats_equal_mistral_common(pair):
    name, tok, reference = pair
    conversations = {**OPEN, **(TOOLS if name != "sp-v1" else {})}
    if name == "sp-v1":  # v1 renders the built-in template, which refuses consecutive assistant turns
        conversations.pop("merged-assistants")
    for label, messages in conversations.items():
        ours = tok.apply_chat_template(messages, continue_final_message=True)
        assert ours == _reference(reference, messages), (name, label)
        closed = tok.apply_chat_template(messages)
        assert closed == ours + [tok.eos_token_id], (name, label)  # open = closed without the final </s>


def test_mistral_formats_refuse_what_mistral_common_refuses(pair):
    name, tok, reference = pair
    with pytest.raises(Exception, match="assistant"):
        _reference(reference, [m(U, "Hi")])
    with pytest.raises(TokenizerError, match="assistant"):
        tok.apply_chat_template([m(U, "Hi")], continue_final_message=True)
    with pytest.raises(TokenizerError, match="add_generation_prompt"):
        tok.apply_chat_template(OPEN["simple"], continue_final_message=True, add_generation_prompt=True)


# ----- Jinja templates, against transformers on the same file ------------------------------------

GENERATION = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}{% generation %}"
              "{{ m.content }}<|im_end|>{% endgeneration %}\n{% else %}{{ m.content }}<|im_end|>\n{% endif %}"
              "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
JINJA = {**OPEN, "user-last": [m(U, "Complete: the harbour")],  # transformers continues any role
         "chunks": [m(U, "Hi"), {"role": A, "content": [{"type": "text", "text": "Part one, "}]}]}


@pytest.fixture(scope="module")
def smol_pair():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    path = default_model_or_skip()
    theirs = hf_gguf_tokenizer(path)
    return MistralTokenizer.from_pretrained(path), theirs


@pytest.mark.parametrize("template", [None, GENERATION], ids=["smollm2-own", "generation-blocks"])
def test_jinja_templates_equal_transformers(smol_pair, template):
    ours, theirs = smol_pair
    for label, messages in JINJA.items():
        if label == "chunks" and template is None:
            continue  # SmolLM2's template concatenates content as a string
        kwargs = dict(continue_final_message=True, chat_template=template)
        text = ours.apply_chat_template(messages, tokenize=False, **kwargs)
        assert text == theirs.apply_chat_template(messages, tokenize=False, **kwargs), label
        assert ours.apply_chat_template(messages, **kwargs) == theirs.apply_chat_template(
            messages, return_dict=False, **kwargs), label
        closed = ours.apply_chat_template(messages, tokenize=False, chat_template=template)
        assert closed.startswith(text) and len(closed) > len(text), label


def test_jinja_errors_are_transformers_errors(smol_pair):
    ours, theirs = smol_pair
    cases = [dict(add_generation_prompt=True), dict(return_dict=True, return_assistant_tokens_mask=True)]
    for extra in cases:
        for tok in (ours, theirs):
            with pytest.raises(ValueError, match="continue_final_message"):
                tok.apply_chat_template(OPEN["simple"], continue_final_message=True, **extra)
    for tok in (ours, theirs):  # a template that drops the final message cannot leave it open
        with pytest.raises(ValueError, match="final message"):
            tok.apply_chat_template(OPEN["simple"], continue_final_message=True,
                                    chat_template="{% for m in messages[:-1] %}{{ m.content }}{% endfor %}content")


def test_builtin_template_v1_continues_like_mistral_common(tmp_path):
    """A bare tokenizer.model (no chat version) renders the built-in template Transformers' way; the
    v1 file keeps mistral-common's rule that only an assistant message is continued."""
    reference = ReferenceTokenizer.from_file(str(DATA / FILES["sp-v1"]))
    v1 = MistralTokenizer.from_pretrained(DATA / FILES["sp-v1"])
    (tmp_path / "tokenizer.model").write_bytes((DATA / FILES["sp-v1"]).read_bytes())
    bare = MistralTokenizer.from_pretrained(tmp_path / "tokenizer.model")
    for label, messages in OPEN.items():
        if label != "merged-assistants":
            assert bare.apply_chat_template(messages, continue_final_message=True) == _reference(reference, messages)
    assert bare.apply_chat_template([m(U, "Hi")], continue_final_message=True, tokenize=False) == "<s>[INST] Hi"
    with pytest.raises(TokenizerError, match="assistant"):
        v1.apply_chat_template([m(U, "Hi")], continue_final_message=True)


def test_continue_keeps_the_callers_messages(smol_pair):
    ours, _ = smol_pair
    messages = json.loads(json.dumps(JINJA["chunks"]))
    ours.apply_chat_template(messages, continue_final_message=True, chat_template=GENERATION)
    assert messages == JINJA["chunks"]
