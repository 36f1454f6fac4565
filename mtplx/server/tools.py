"""Tool calls: finding them in the model's text and parsing them, for every API dialect.

The model writes a tool call as text between two markers (Qwen3.5/3.6:
``<tool_call>\\n<function=NAME>\\n<parameter=P>\\nV\\n</parameter>\\n</function>\\n</tool_call>``).
Which markers and which parser belong to a model comes from mlx-lm, which infers them from the
chat template (``mlx_lm.tool_parsers``; Qwen3.5's format is its ``qwen3_coder`` parser), so
mtplx parses exactly what mlx-lm's own server parses and writes no parser of its own.

:class:`ToolCallSplitter` cuts the streamed text into plain text and parsed calls as it arrives;
the non-streamed answer runs the same splitter over the whole text, so both paths agree.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from mtplx.server.http_errors import APIError, unsupported

log = logging.getLogger("mtplx.server")


@dataclass(frozen=True)
class ToolFormat:
    """How one model writes tool calls: the two markers and the parser of what is between."""

    start: str
    end: str
    parse: Callable[[str, Any], dict[str, Any]]


def tool_format(tokenizer: Any) -> ToolFormat | None:
    """The model's tool-call format, or None when its chat template renders no tools (mlx-lm
    infers the format from the template; a template it does not recognise has none)."""
    if not getattr(tokenizer, "has_tool_calling", False):
        return None
    start, end, parse = tokenizer.tool_call_start, tokenizer.tool_call_end, tokenizer.tool_parser
    if not start or not end or parse is None:
        return None
    return ToolFormat(start, end, parse)


def check_tools(fmt: ToolFormat | None, *, forced: bool, strict: Sequence[str], response_format: bool) -> None:
    """The refusals every dialect shares for a request whose tools reach the model: ``forced``,
    a tool_choice that demands a call; ``strict``, the request fields asking for schema-exact
    arguments; ``response_format``, a grammar on the output (it would forbid any tool call)."""
    if forced:
        raise unsupported("tool_choice", "mtplx cannot force a tool call (that needs constrained decoding of the "
                                         "call); use 'auto' or 'none'")
    if strict:
        raise unsupported(strict[0], "the arguments the model writes are not constrained to the schema; leave "
                                     "strict unset or false")
    if response_format:
        raise unsupported("response_format", "the grammar would hold every token to the format, so the model could "
                                             "never call a tool; send tools or a response_format, not both")
    if fmt is None:
        raise unsupported("tools", "this model's chat template does not render tools (mlx-lm recognises no "
                                   "tool-call format in it)")


def parse_arguments(text: str, param: str) -> dict[str, Any]:
    """A tool call's arguments, a JSON object in a string, as the object."""
    try:
        value = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as e:
        raise APIError(400, f"Invalid value for '{param}': not JSON ({e}).", param=param, code="invalid_value") from None
    if not isinstance(value, dict):
        raise APIError(400, f"Invalid value for '{param}': expected a JSON object.", param=param, code="invalid_value")
    return value


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


Piece = str | ToolCall  # plain text, or one parsed call


class ToolCallSplitter:
    """Text in, plain text and :class:`ToolCall` pieces out, as the text streams.

    Text that may be the beginning of a start marker is held back until the next chunk says
    whether it is one. Whitespace next to a tool call is the format's separator, not content:
    it is dropped (and held back meanwhile, so a stream never sends what it would later drop).
    A call whose text does not parse is passed on as plain text, markers included, so nothing
    the model wrote is lost; so is a call cut off by the end of the generation.
    """

    def __init__(self, fmt: ToolFormat, tools: list[dict[str, Any]] | None):
        self.fmt, self.tools = fmt, tools
        self.pending = ""  # text not yet passed on
        self.in_call = False
        self.sep = ""  # the whitespace before the call being read, given back if it fails
        self.after_call = False  # the last piece out was a call
        self.calls = 0

    def feed(self, text: str) -> list[Piece]:
        self.pending += text
        out: list[Piece] = []
        start, end = self.fmt.start, self.fmt.end
        while True:
            if self.in_call:
                at = self.pending.find(end)
                if at == -1:
                    return out
                body, self.pending = self.pending[:at], self.pending[at + len(end):]
                self.in_call = False
                out.extend(self._call(body))
                continue
            at = self.pending.find(start)
            if at != -1:
                before = self.pending[:at]
                self._text(before.rstrip(), out)
                self.sep = before[len(before.rstrip()):]
                self.pending = self.pending[at + len(start):]
                self.in_call = True
                continue
            # Hold back a tail that could begin the start marker, and trailing whitespace.
            keep = next((n for n in range(min(len(start) - 1, len(self.pending)), 0, -1)
                         if start.startswith(self.pending[-n:])), 0)
            head = self.pending[:len(self.pending) - keep]
            stripped = head.rstrip()
            self._text(stripped, out)
            self.pending = head[len(stripped):] + self.pending[len(head):]
            return out

    def finish(self) -> list[Piece]:
        """The generation is over: pass on what was held back (a call cut off before its end
        marker goes out as text, marker included)."""
        out: list[Piece] = []
        text = self.sep + self.fmt.start + self.pending if self.in_call else self.pending
        self._text(text.rstrip() if self.calls else text, out)
        self.pending, self.in_call = "", False
        return out

    def _text(self, text: str, out: list[Piece]) -> None:
        if self.after_call:
            text = text.lstrip()
        if text:
            out.append(text)
            self.after_call = False

    def _call(self, body: str) -> list[Piece]:
        try:
            parsed = self.fmt.parse(body.strip(), self.tools)
            name, arguments = parsed["name"], parsed.get("arguments", {})
            if isinstance(arguments, str):
                arguments = json.loads(arguments)
            if not isinstance(name, str) or not isinstance(arguments, dict):
                raise ValueError(f"expected a name and an arguments object, got {parsed!r}")
        except Exception as e:  # noqa: BLE001 - any parser failure: keep the text, do not drop it
            log.warning("mtplx: a tool call did not parse (%s); returned as text", e)
            out: list[Piece] = []
            self._text(self.sep + self.fmt.start + body + self.fmt.end, out)
            return out
        self.calls += 1
        self.after_call = True
        return [ToolCall(name, arguments)]


def split_text(fmt: ToolFormat, tools: list[dict[str, Any]] | None, text: str) -> tuple[str, list[ToolCall]]:
    """A whole generation's text -> (its plain text, its tool calls)."""
    splitter = ToolCallSplitter(fmt, tools)
    pieces = splitter.feed(text) + splitter.finish()
    return "".join(p for p in pieces if isinstance(p, str)), [p for p in pieces if isinstance(p, ToolCall)]


class Answer:
    """The generated text as it should reach the client: as is, or split into plain text and
    tool calls when the request has tools (``fmt`` given)."""

    def __init__(self, fmt: ToolFormat | None = None, tools: list[dict[str, Any]] | None = None):
        self.splitter = ToolCallSplitter(fmt, tools) if fmt is not None else None

    def feed(self, text: str, final: bool) -> list[Piece]:
        if self.splitter is None:
            return [text] if text else []
        return self.splitter.feed(text) + (self.splitter.finish() if final else [])

    @property
    def called(self) -> bool:
        return self.splitter is not None and self.splitter.calls > 0
