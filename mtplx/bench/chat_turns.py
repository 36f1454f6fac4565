"""`mtplx bench --chat-turns N`: time to first token per turn of a conversation, with and
without the prompt cache, in one run.

The conversation is the terminal chat's (mtplx/generation/conversation.py): each turn appends a question
to the tokens the model has seen and written. Turn by turn, the cached run answers the question
with the conversation's prompt cache, then the same prompt ids are prefilled cold, so both
columns time the same tokens under the same machine conditions. Time to first token is from the
call to the first token out: prefill (of what the cache does not hold) plus the first sample.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from mtplx.generation.conversation import Conversation

QUESTIONS = [
    "def fibonacci(n):",
    "class LRUCache:",
    "import json\n\ndef load_config(path):",
    "def parse_header(line):",
    "class Stack:",
    "def merge_sorted(a, b):",
    "import os\n\ndef walk_files(root):",
    "def is_palindrome(s):",
    "class Matrix:",
    "def flatten(items):",
]


@dataclass
class Turn:
    prompt_tokens: int
    cached_tokens: int
    ttft_cached_s: float
    ttft_cold_s: float
    reply_tokens: int

    @property
    def speedup(self) -> float:
        return self.ttft_cold_s / self.ttft_cached_s if self.ttft_cached_s > 0 else float("nan")


@dataclass
class ChatTurnsReport:
    depth: int
    max_tokens: int
    turns: list[Turn] = field(default_factory=list)

    def table(self) -> str:
        head = f"{'turn':>4} {'prompt':>7} {'cached':>7} {'TTFT cached':>12} {'TTFT cold':>10} {'speedup':>8}"
        rows = [head, "-" * len(head)]
        for i, t in enumerate(self.turns, 1):
            rows.append(f"{i:>4} {t.prompt_tokens:>7} {t.cached_tokens:>7} {t.ttft_cached_s:>11.3f}s "
                        f"{t.ttft_cold_s:>9.3f}s {t.speedup:>7.1f}x")
        return "\n".join(rows)

    def verdict(self) -> str:
        first, last = self.turns[0], self.turns[-1]
        return (f"Turn {len(self.turns)}'s time to first token is {last.ttft_cached_s / first.ttft_cached_s:.2f}x "
                f"turn 1's with the prompt cache ({last.cached_tokens} of {last.prompt_tokens} prompt tokens "
                f"cached), {last.ttft_cold_s / first.ttft_cold_s:.2f}x without it.")

    def as_dict(self) -> dict[str, Any]:
        return {"depth": self.depth, "max_tokens": self.max_tokens,
                "turns": [{"turn": i, "prompt_tokens": t.prompt_tokens, "cached_tokens": t.cached_tokens,
                           "ttft_cached_s": round(t.ttft_cached_s, 4), "ttft_cold_s": round(t.ttft_cold_s, 4),
                           "speedup": round(t.speedup, 3), "reply_tokens": t.reply_tokens}
                          for i, t in enumerate(self.turns, 1)],
                "verdict": self.verdict()}


def _first_token_seconds(responses) -> tuple[float, list[Any]]:
    t0 = time.perf_counter()
    first = next(responses)
    ttft = time.perf_counter() - t0
    return ttft, [first, *responses]


def run_chat_turns(model: Any, tokenizer: Any, turns: int, *, depth: int, max_tokens: int = 48,
                   temperature: float = 0.0, seed: int = 0, enable_thinking: bool | None = False,
                   progress: Callable[[str], None] | None = None) -> ChatTurnsReport:
    import mtplx

    if turns < 1:
        raise ValueError("turns must be >= 1")
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(turns)]
    cache = mtplx.make_prompt_cache(model)
    conversation = Conversation(tokenizer)
    messages: list[dict[str, str]] = []
    report = ChatTurnsReport(depth=depth, max_tokens=max_tokens)
    kw = dict(temperature=temperature, depth=depth, seed=seed)
    for i, question in enumerate(questions, 1):
        messages.append({"role": "user", "content": question})
        ids = conversation.prompt(messages, enable_thinking)
        ttft, responses = _first_token_seconds(
            mtplx.stream_generate(model, tokenizer, ids, max_tokens=max_tokens, prompt_cache=cache, **kw))
        reply = [t for r in responses for t in r.tokens]
        last = responses[-1]
        cold, _ = _first_token_seconds(mtplx.stream_generate(model, tokenizer, ids, max_tokens=1, **kw))
        conversation.add_reply(reply)
        messages.append({"role": "assistant", "content": "".join(r.text for r in responses)})
        report.turns.append(Turn(prompt_tokens=len(ids), cached_tokens=last.cached_tokens, ttft_cached_s=ttft,
                                 ttft_cold_s=cold, reply_tokens=len(reply)))
        if progress:
            progress(f"turn {i}/{turns}: {len(ids)} prompt tokens, {last.cached_tokens} cached, "
                     f"time to first token {ttft:.3f} s (cold {cold:.3f} s)")
    return report
