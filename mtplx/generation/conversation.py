"""A chat whose tokens only grow, so a prompt cache serves every earlier turn.

Chat templates render past assistant turns differently from how they were generated: Qwen3.5's
drops the ``<think>`` block of every turn before the last question. Re-rendering the whole
history each turn therefore changes the tokens right before each earlier reply, and everything
after that point has to be prefilled again. The terminal chat instead keeps the tokens the
model actually saw and wrote, and appends only the new turn, rendered by the template (as
``mlx_lm.chat`` does): each turn prefills only the new message. The model sees its past replies
exactly as it produced them.

The new turn's tokens come from the template itself: the rendering of the conversation with the
new message, past the rendering without it, plus the template's closing of an assistant turn
(``<|im_end|>\\n``), less the end-of-turn token the reply already ended with. Where a template
does not extend that way (the rendering with the new message does not start with the one
without), the turn falls back to the full rendering, which the prompt cache still serves up to
the first difference.
"""

from __future__ import annotations

from typing import Any

class Conversation:
    """The token ids a chat has fed the model and the model has generated, turn after turn."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._undo: list[int] = []
        self._closing: list[int] | None = None

    def prompt(self, messages: list[dict[str, Any]], enable_thinking: bool | None = None) -> list[int]:
        """The ids to answer ``messages`` (whose last one is the new question) from: the tokens so
        far and the new turn. Then :meth:`add_reply` with the reply's tokens, or :meth:`drop_turn`
        if the turn did not complete."""
        from mtplx.generation.chat_template import chat_ids

        self._undo = self.ids
        full = chat_ids(self.tokenizer, messages, enable_thinking, generation_prompt=True)
        first = not self.ids or len(messages) < 2
        closed = [] if first else chat_ids(self.tokenizer, messages[:-1], enable_thinking, generation_prompt=False)
        closing = None if first else self._assistant_closing(messages)
        if first or closing is None:
            self.ids = full  # a first turn, or a template that does not show replies as is: the full rendering
            return list(full)
        turn = full[len(closed):] if full[: len(closed)] == closed else self._new_turn(messages, full, closing,
                                                                                      enable_thinking)
        if turn is None:
            self.ids = full  # a template that does not extend: the full rendering (the cache serves its prefix)
            return list(full)
        if closing and self.ids[-1] == closing[0]:
            closing = closing[1:]  # the reply already ended with the template's end-of-turn token
        self.ids = self.ids + closing + turn
        return list(self.ids)

    def _new_turn(self, messages: list[dict[str, Any]], full: list[int], closing: list[int],
                  enable_thinking: bool | None) -> list[int] | None:
        """The new message's turn in ``full`` where the history renders differently once a question
        follows it (Qwen3.5's template drops the last reply's <think> block then): what follows the
        last assistant closing before the new message's text. A rendering with a stand-in question
        shows where that text starts."""
        from mtplx.engine.prompt_cache import common_prefix
        from mtplx.generation.chat_template import chat_ids

        if not closing:
            return None
        other = chat_ids(self.tokenizer, [*messages[:-1], {**messages[-1], "content": "\x00"}], enable_thinking,
                         generation_prompt=True)
        n = len(closing)
        for i in range(common_prefix(full, other) - n, -1, -1):
            if full[i:i + n] == closing:
                return full[i + n:]
        return None

    def add_reply(self, tokens: list[int]) -> None:
        """The reply's tokens as generated (its end-of-turn token included, if it has one)."""
        self.ids = self.ids + list(tokens)

    def drop_turn(self) -> None:
        """Back to before the last :meth:`prompt` (its turn did not complete)."""
        self.ids = self._undo

    def reset(self) -> None:
        self.ids = self._undo = []

    def _assistant_closing(self, messages: list[dict[str, Any]]) -> list[int] | None:
        """The tokens the template puts after an assistant turn's text (e.g. ``<|im_end|>\n``)."""
        if self._closing is None:
            from mtplx.generation.chat_template import assistant_closing

            question = next((m for m in messages if m["role"] == "user"), {"role": "user", "content": "x"})
            self._closing = assistant_closing(self.tokenizer, question)
        return self._closing
