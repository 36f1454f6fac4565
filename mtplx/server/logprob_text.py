"""Logprobs in OpenAI's two shapes: chat's ``{"content": [{token, logprob, bytes,
top_logprobs}]}`` and the completions API's ``{tokens, token_logprobs, top_logprobs,
text_offset}``. The values come from the engine (:mod:`mtplx.engine.logprobs`); here they get
their token text. End-of-sequence tokens are left out, as they are of the text.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from mtplx.engine.logprobs import TokenLogprob


@lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's, Qwen's): the character that stands for each byte.
    Printable Latin-1 bytes stand for themselves; the others map to 256, 257, ... in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + n)
    return {c: b for b, c in chars.items()}


class TokenText:
    """A token's text and exact bytes. A byte-level BPE token may hold part of a UTF-8
    character: its ``bytes`` are exact and its text shows the missing part as U+FFFD, as
    OpenAI does."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.eos = set(getattr(tokenizer, "eos_token_ids", None) or [])
        self.bytes = lru_cache(maxsize=65536)(self._bytes)

    def _bytes(self, token: int) -> bytes:
        text = self.tokenizer.decode([token])
        if "\ufffd" not in text:
            return text.encode("utf-8")
        piece = self.tokenizer.convert_ids_to_tokens(token)
        table = byte_level_alphabet()
        return b"".join(bytes([table[c]]) if c in table else c.encode("utf-8") for c in piece)

    def text(self, token: int) -> str:
        return self.bytes(token).decode("utf-8", errors="replace")

    def entry(self, token: int, logprob: float) -> dict[str, Any]:
        return {"token": self.text(token), "logprob": logprob, "bytes": list(self.bytes(token))}

    def chat(self, logprobs: list[TokenLogprob] | None) -> list[dict[str, Any]]:
        """Chat's ``logprobs.content`` entries."""
        return [{**self.entry(lp.token, lp.logprob), "top_logprobs": [self.entry(t, v) for t, v in lp.top]}
                for lp in logprobs or [] if lp.token not in self.eos]

    def completion(self, logprobs: list[TokenLogprob] | None, offset: int, k: int) -> dict[str, Any]:
        """The completions API's ``logprobs`` object; ``offset``: characters of text before these
        tokens (for ``text_offset``)."""
        out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for lp in logprobs or []:
            if lp.token in self.eos:
                continue
            text = self.text(lp.token)
            out["tokens"].append(text)
            out["token_logprobs"].append(lp.logprob)
            out["top_logprobs"].append({self.text(t): v for t, v in lp.top} if k else None)
            out["text_offset"].append(offset)
            offset += len(text)
        return out
