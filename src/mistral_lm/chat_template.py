"""Chat templates: sandboxed Jinja rendering, and the built-in Mistral instruct v0.1/v0.2 format.

Two guarantees, both tested against mistral-common:

* Templates run in Jinja's `ImmutableSandboxedEnvironment`: a template from a downloaded folder
  cannot reach Python internals (`__class__`, `__subclasses__`) or mutate its inputs.
* Message text cannot inject control tokens. The special-token strings inside messages are
  escaped before rendering, the output is split at the special tokens the *template* wrote, and
  the text between them (message text included, unescaped again) is encoded as plain text. This
  is what mistral-common does: it encodes "[INST] {content} [/INST]" with sentencepiece, so a
  "</s>" typed by a user stays the characters "</s>".
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import TokenizerError

if TYPE_CHECKING:
    from .tokenizer import MistralTokenizer

# Mistral-7B-Instruct v0.1/v0.2 (mistral-common's v1 instruct tokenizer): "<s>[INST] user [/INST]
# answer</s>[INST] ...". An optional first system message is prepended to the first user message,
# roles must alternate, and the answer is preceded by one space: mistral-common encodes the answer
# on its own, where sentencepiece's dummy prefix plays that space.
MISTRAL_INSTRUCT_TEMPLATE = """\
{%- if messages and messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message['role'] not in ['user', 'assistant'] %}
        {{- raise_exception('Only user and assistant roles are supported, after an optional first system message; '
                            ~ 'got role ' ~ message['role'] ~ ' at position ' ~ loop.index0) }}
    {%- elif (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/... after an optional '
                            ~ 'first system message; got ' ~ message['role'] ~ ' at position ' ~ loop.index0) }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- '[INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- '[INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- else %}
        {{- ' ' + message['content'] + eos_token }}
    {%- endif %}
{%- endfor %}
"""

# Transformers options that tokenize differently; unsupported here rather than passed to the template.
_UNSUPPORTED = frozenset({"padding", "truncation", "max_length", "tokenizer_kwargs", "continue_final_message",
                          "return_assistant_tokens_mask"})
_ESCAPE = "\ue000"  # private-use character that starts an escaped special-token string
_INDEX_BASE = 0xF0000  # the escaped string's index, as a supplementary private-use character


def _raise_exception(message: str) -> None:
    """Templates call this to reject a conversation (the Transformers template convention)."""
    raise TokenizerError(f"chat template: {message}")


@functools.lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    """The Transformers template environment: trimmed blocks, `raise_exception`, `strftime_now`, `tojson`."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    return env


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> Any:
    return _environment().from_string(source)


def _escape(value: Any, pattern: re.Pattern[str], index: dict[str, int]) -> Any:
    """A copy of a message with special-token strings (and the escape character) escaped."""
    if isinstance(value, str):
        return pattern.sub(lambda m: _ESCAPE + chr(_INDEX_BASE + index[m[0]]), value)
    if isinstance(value, Mapping):
        return {k: _escape(v, pattern, index) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_escape(v, pattern, index) for v in value]
    return value


def render_chat(tokenizer: MistralTokenizer, messages: Sequence[Mapping[str, Any]], *,
                add_generation_prompt: bool = False, chat_template: str | None = None,
                **template_kwargs: Any) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_special_token) pieces, message text always non-special."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not all(
            isinstance(m, Mapping) and isinstance(m.get("role"), str) for m in messages):
        raise TokenizerError("messages must be a list of dicts with a 'role' and a 'content', e.g. "
                             "[{'role': 'user', 'content': 'Hello'}]")
    specials = [_ESCAPE, *sorted(tokenizer.all_special_tokens, key=len, reverse=True)]
    index = {s: k for k, s in enumerate(specials)}
    pattern = re.compile("|".join(map(re.escape, specials)))
    source = chat_template or tokenizer.chat_template or MISTRAL_INSTRUCT_TEMPLATE
    rendered = _compile(source).render(
        messages=[_escape(m, pattern, index) for m in messages], add_generation_prompt=add_generation_prompt,
        **tokenizer.special_tokens_map, **template_kwargs)
    unescape = re.compile(_ESCAPE + "([\U000f0000-\U000ffffd])")
    pieces, start = [], 0
    for match in pattern.finditer(rendered):  # only the template's own special tokens are left to find
        if match[0] != _ESCAPE:
            pieces += [(rendered[start:match.start()], False), (match[0], True)]
            start = match.end()
    pieces.append((rendered[start:], False))
    return [(unescape.sub(lambda m: specials[ord(m[1]) - _INDEX_BASE], text) if not special else text, special)
            for text, special in pieces if text]


def apply_chat_template(tokenizer: MistralTokenizer, messages: Sequence[Mapping[str, Any]], tokenize: bool = True,
                        add_generation_prompt: bool = False, return_tensors: str | None = None,
                        return_dict: bool = False, chat_template: str | None = None, **template_kwargs: Any) -> Any:
    """Render `messages` with the tokenizer's template (or the built-in Mistral one) and encode it.

    Returns the string with `tokenize=False`, else the ids: a list, a (1, T) tensor with
    `return_tensors`, or a `BatchEncoding` (input_ids, attention_mask) with `return_dict=True`.

    >>> tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    '<s>[INST] Hi [/INST]'
    """
    from .tokenizer import BatchEncoding, _as_tensors

    if _UNSUPPORTED & set(template_kwargs):
        raise TypeError(f"apply_chat_template() does not support {sorted(_UNSUPPORTED & set(template_kwargs))}; "
                        "render with tokenize=False and call the tokenizer for padding or truncation")
    pieces = render_chat(tokenizer, messages, add_generation_prompt=add_generation_prompt,
                         chat_template=chat_template, **template_kwargs)
    if not tokenize:
        return "".join(text for text, _ in pieces)
    texts = iter(tokenizer._encode_texts([text for text, special in pieces if not special], True))
    ids = [i for text, special in pieces for i in ([tokenizer._vocab[text]] if special else next(texts))]
    value = _as_tensors([ids], return_tensors) if return_tensors else ids
    if not return_dict:
        return value
    mask = _as_tensors([[1] * len(ids)], return_tensors) if return_tensors else [1] * len(ids)
    return BatchEncoding(input_ids=value, attention_mask=mask)
