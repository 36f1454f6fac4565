"""What a prompt may be, checked before anything is tokenized or touches the model.

A prompt is a string, a list of token ids, or a list of chat messages. A malformed one (None,
a message without text, an unknown role, text that is not valid Unicode, a stop that is not a
string) raises one :class:`MtplxError` naming the problem, instead of whatever the tokenizer or
the chat template would raise. Token ids are checked against the vocabulary by
:func:`mtplx.core.knobs.check_token_ids`, which needs the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from mtplx.errors import MtplxError


@dataclass(frozen=True)
class EncodedPrompt:
    """A prompt already tokenized: its ids, and the positions where the next prompt of the same
    conversation may start to differ from them (a prompt cache snapshots its state there; see
    mtplx.generation.chat_template.reuse_boundaries)."""

    ids: list[int]
    boundaries: tuple[int, ...] = ()

# The roles Qwen3.5/3.6's chat template knows; it raises on any other.
ROLES = ("system", "user", "assistant", "tool")
PROMPT_FORMS = "a string, a list of token ids, or a list of chat messages ({'role': ..., 'content': ...})"


def _check_text(text: str, what: str) -> None:
    # Lone surrogates (from bytes that were not UTF-8) make tokenizers raise a bare TypeError.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise MtplxError(f"{what} is not valid Unicode text (a lone surrogate at character {e.start}, "
                         "typically from bytes that were not UTF-8)", fix="decode the input as UTF-8 first") from None


def _check_messages(messages: list[Any]) -> None:
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise MtplxError(f"prompt item {i} is a {type(m).__name__} among chat messages", fix=f"pass {PROMPT_FORMS}")
        role = m.get("role")
        if role not in ROLES:
            raise MtplxError(f"message {i} has role {role!r}, not one the chat template knows",
                             fix=f"use one of {', '.join(ROLES)}")
        content = m.get("content")
        if content is None and role == "assistant" and m.get("tool_calls"):
            continue  # a tool call may come without text
        if not isinstance(content, str):
            problem = "no content" if content is None else f"content of type {type(content).__name__}"
            raise MtplxError(f"message {i} ({role}) has {problem}", fix="give every message its text as a string in 'content'")
        _check_text(content, f"message {i}'s content")


def check_prompt(prompt: Any) -> str | list[Any]:
    """The prompt's form, checked before anything is tokenized: a string, token ids (arrays are
    accepted and listed; their values are checked against the vocabulary later) or chat messages
    with a known role and text content. Raises :class:`MtplxError` naming the problem."""
    if isinstance(prompt, str):
        _check_text(prompt, "the prompt")
        return prompt
    if isinstance(prompt, EncodedPrompt):
        return list(prompt.ids)
    if hasattr(prompt, "tolist") and not isinstance(prompt, (list, tuple)):  # mx.array, numpy
        prompt = prompt.tolist()
    if isinstance(prompt, (bytes, bytearray, dict)) or not isinstance(prompt, Sequence):
        raise MtplxError("the prompt is None" if prompt is None else f"the prompt is of type {type(prompt).__name__}",
                         fix=f"pass {PROMPT_FORMS}")
    items = list(prompt)
    if any(isinstance(m, dict) for m in items):
        _check_messages(items)
    return items
