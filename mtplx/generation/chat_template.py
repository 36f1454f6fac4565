"""Chat messages -> token ids through the model's chat template, and what the template's
rendering tells a prompt cache (where the next turn's tokens may leave this prompt's).

One place renders templates, for the API (mtplx.api), the terminal chat's growing conversation
(mtplx.generation.conversation) and the server (through mtplx.api.reuse_boundaries).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mtplx.engine.prompt_cache import common_prefix
from mtplx.errors import MtplxError
from mtplx.generation.prompts import EncodedPrompt

_SENTINEL = "\x00mtplx-reply\x00"


def is_chat(prompt: Any) -> bool:
    """A list of chat messages (as opposed to text or token ids)."""
    return isinstance(prompt, (list, tuple)) and bool(prompt) and isinstance(prompt[0], dict)


def chat_ids(tokenizer: Any, messages: list[dict], enable_thinking: bool | None, generation_prompt: bool,
             **template_kwargs: Any) -> list[int]:
    """``messages`` rendered by the tokenizer's chat template, as token ids; a template that
    refuses them raises :class:`MtplxError`. ``template_kwargs`` (tools, ...) go to the template."""
    from jinja2 import TemplateError

    kwargs = dict(template_kwargs)
    if enable_thinking is not None:
        kwargs["enable_thinking"] = enable_thinking
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                            tokenizer_kwargs={"verbose": False}, **kwargs)
    except TemplateError as e:
        raise MtplxError(f"the model's chat template refused these messages: {e}",
                         fix="check the roles and the order of the messages") from None
    # transformers returns a BatchEncoding (a Mapping, not a dict) where mlx-lm's wrapper returns ids.
    return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)


def assistant_closing(tokenizer: Any, question: dict[str, Any]) -> list[int] | None:
    """The tokens the template puts after an assistant turn's text (e.g. ``<|im_end|>\\n``),
    rendered after ``question``; None where the template does not show the reply's text as is."""
    text = tokenizer.apply_chat_template([question, {"role": "assistant", "content": _SENTINEL}],
                                         add_generation_prompt=False, tokenize=False)
    if _SENTINEL not in text:
        return None
    return list(tokenizer.encode(text.split(_SENTINEL, 1)[1], add_special_tokens=False))


def reuse_boundaries(tokenizer: Any, prompt: Any, ids: list[int], enable_thinking: bool | None = None,
                     **template_kwargs: Any) -> tuple[int, ...]:
    """Where the next prompt of this conversation may start to differ from ``ids``: a prompt
    cache snapshots its state there.

    - After the system (and tools) prefix: the messages before the first user message are what
      an agent's conversations share (a coding agent's system prompt and tools run to 5-20K
      tokens), so a second conversation reuses them even below the periodic snapshots.
    - Before the reply: chat templates often render a past assistant turn differently from the
      generation prompt that preceded the reply (Qwen's drop the ``<think>`` block), so the next
      turn's tokens leave this prompt's before its end. Rendering the conversation with a
      stand-in reply shows where: at the end of the common prefix of that rendering and this
      prompt.

    Text and token prompts have no such place (the prompt's own end is always snapshotted).
    ``template_kwargs`` (tools, ...) are those the prompt was rendered with."""
    if isinstance(prompt, EncodedPrompt):
        return prompt.boundaries
    if not is_chat(prompt):  # text, token ids (a list or an array): no such place
        return ()
    out = []
    reply = {"role": "assistant", "content": "x"}
    # The reply as the live turn, and as a past turn once the next question follows it: Qwen's
    # official templates render a past assistant turn without its <think> block, so the next
    # turn leaves this prompt right after the assistant's header, before the generation prompt's
    # own end. A snapshot at each place lets the next turn reuse all it shares.
    for rendered in ([*prompt, reply], [*prompt, reply, {"role": "user", "content": "y"}]):
        try:
            history = chat_ids(tokenizer, rendered, enable_thinking, generation_prompt=False, **template_kwargs)
        except Exception:  # noqa: BLE001 - a template that refuses this shape: no boundary, no harm
            continue
        # One token back: the reply's first characters may merge with the last token before them
        # (a reply opening with "\n" turns "assistant\n" + "\n" into one "\n\n" token).
        out.append(max(common_prefix(history, ids) - 1, 0))
    out.extend(_prefix_boundary(tokenizer, prompt, ids, enable_thinking, **template_kwargs))
    return tuple(sorted(set(b for b in out if b > 0)))


def _prefix_boundary(tokenizer: Any, prompt: Any, ids: list[int], enable_thinking: bool | None,
                     **template_kwargs: Any) -> list[int]:
    """The end of the system/tools prefix: where the rendering of the leading system messages
    (or of no message, with tools) stops being a prefix of ``ids``. Rendering two different
    stand-in questions after it and taking their common prefix finds where the shared part
    ends, whatever the template writes around the first user message."""
    lead = 0
    while lead < len(prompt) and prompt[lead].get("role") == "system":
        lead += 1
    if lead == len(prompt) or (lead == 0 and not template_kwargs.get("tools")):
        return []  # nothing before the first user message, or no user message yet
    try:
        a = chat_ids(tokenizer, [*prompt[:lead], {"role": "user", "content": "a"}], enable_thinking,
                     generation_prompt=False, **template_kwargs)
        b = chat_ids(tokenizer, [*prompt[:lead], {"role": "user", "content": "b"}], enable_thinking,
                     generation_prompt=False, **template_kwargs)
    except Exception:  # noqa: BLE001 - as above: no boundary, no harm
        return []
    # One token back, for a merge at the join as above; and only where ids share that prefix.
    shared = max(min(common_prefix(a, b), common_prefix(a, ids)) - 1, 0)
    return [shared] if shared < len(ids) - 1 else []
