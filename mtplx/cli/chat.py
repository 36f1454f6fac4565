"""The terminal chat of `mtplx start`: the loop, the slash commands and the status line.

Ctrl-C while a reply streams stops that reply and drops the whole turn (the question and the
partial answer) from the history, so the next question is not asked of a half-finished answer;
Ctrl-C at the prompt only prints a hint. Ctrl-D or /quit leaves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import click

from mtplx.cli.launcher import MAX_DEPTH
from mtplx.engine.stats import AcceptanceTally

PROMPT = "you> "
REPLY = "mtplx> "
GOODBYE = "Bye."
INTERRUPT_HINT = "(Ctrl-C stops a reply while it streams; type /quit or press Ctrl-D to leave)"

HELP = """\
Commands:
  /help              this list
  /reset             forget the conversation so far
  /depth N           draft depth: 0 = plain AR, N > 0 = MTP with N drafted tokens per step
  /temp X            sampling temperature (0 = greedy)
  /max N             max tokens per reply
  /thinking on|off   the chat template's thinking mode
  /stats             totals since the start: replies, tokens, tok/s, acceptance per position
  /quit              leave (Ctrl-D too)
Ctrl-C while a reply streams stops it; that turn is dropped from the history."""


class Quit(Exception):
    """Raised by /quit; the loop says goodbye."""


def parse_command(line: str) -> tuple[str, str] | None:
    """``"/depth 3"`` -> ``("depth", "3")``; anything not starting with '/' is a chat message."""
    line = line.strip()
    if not line.startswith("/"):
        return None
    name, _, arg = line[1:].partition(" ")
    return name.lower(), arg.strip()


def format_status(r: Any) -> str:
    """One line after each reply, from the last GenerationResponse of that reply."""
    depth = getattr(getattr(r, "stats", None), "depth", None)
    mode = "AR" if not r.acceptance else f"MTP d{depth if depth else len(r.acceptance)}"
    acc = " ".join(f"{a:.2f}" for a in r.acceptance) if r.acceptance else "-"
    return (f"[{mode} | {r.generation_tokens} tokens | {r.generation_tps:.1f} tok/s | acceptance {acc}"
            f" | {r.tokens_per_step:.2f} tokens/step | {r.finish_reason or '?'}]")


@dataclass
class Totals:
    """Cumulative statistics over the replies that finished (interrupted ones are not counted)."""

    replies: int = 0
    tokens: int = 0
    decode_seconds: float = 0.0
    acceptance: AcceptanceTally = field(default_factory=AcceptanceTally)

    def add(self, stats: Any) -> None:
        self.replies += 1
        self.tokens += stats.generated
        self.decode_seconds += stats.decode_seconds
        self.acceptance.add(stats)

    def format(self) -> str:
        tps = self.tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0
        tally = self.acceptance
        acc = " ".join(f"d{k + 1} {r:.2f}" for k, (r, d) in enumerate(zip(tally.rates, tally.drafted)) if d)
        return (f"{self.replies} replies | {self.tokens} tokens | mean {tps:.1f} tok/s (tokens over decode time)"
                f" | acceptance {acc or '- (no MTP replies)'}")


@dataclass
class ChatSession:
    model: Any
    tokenizer: Any
    depth: int
    thinking: bool
    max_tokens: int = 512
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    totals: Totals = field(default_factory=Totals)

    @property
    def has_mtp(self) -> bool:
        return bool(getattr(self.model, "has_mtp", False))

    def settings(self) -> str:
        mode = "plain AR (depth 0)" if self.depth == 0 else f"MTP depth {self.depth}"
        temp = self.temperature
        if temp is None:  # show the value the engine will use, not "default"
            contract = getattr(self.model, "contract", None)
            temp = contract.defaults.get("temperature", 0.6) if contract else 0.6
        temp = f"{temp:g}"
        return f"{mode}, temperature {temp}, thinking {'on' if self.thinking else 'off'}, max {self.max_tokens} tokens"

    def command(self, name: str, arg: str) -> str:
        """Run one slash command; returns what to print. Raises Quit for /quit."""
        if name in ("quit", "exit", "q"):
            raise Quit
        if name in ("help", "h", "?"):
            return HELP
        if name == "reset":
            self.messages.clear()
            return "History cleared."
        if name == "depth":
            n = _int(arg)
            if n is None or not 0 <= n <= MAX_DEPTH:
                return f"Usage: /depth N with N from 0 (plain AR) to {MAX_DEPTH}."
            if n > 0 and not self.has_mtp:
                return "This model has no MTP head loaded: only /depth 0 (plain AR) is possible."
            self.depth = n
            return f"Now: {self.settings()}."
        if name in ("temp", "temperature"):
            try:
                t = float(arg)
            except ValueError:
                t = -1.0
            if not 0 <= t <= 5:
                return "Usage: /temp X with X from 0 (greedy) to 5."
            self.temperature = t
            return f"Now: {self.settings()}."
        if name in ("max", "max-tokens"):
            n = _int(arg)
            if n is None or n < 1:
                return "Usage: /max N with N >= 1."
            self.max_tokens = n
            return f"Now: {self.settings()}."
        if name == "thinking":
            if arg.lower() not in ("on", "off"):
                return "Usage: /thinking on|off."
            self.thinking = arg.lower() == "on"
            return f"Now: {self.settings()}."
        if name == "stats":
            return self.totals.format()
        return f"Unknown command /{name}. Type /help for the list."

    def reply(self, text: str, generate: Callable[..., Iterable[Any]]) -> Any:
        """Stream one answer to ``text``; returns its last response, or None if interrupted."""
        self.messages.append({"role": "user", "content": text})
        click.echo(click.style(REPLY, fg="cyan"), nl=False)
        parts: list[str] = []
        last = None
        started = False
        try:
            for r in generate(self.model, self.tokenizer, self.messages, max_tokens=self.max_tokens,
                              temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, depth=self.depth,
                              seed=self.seed, enable_thinking=self.thinking):
                parts.append(r.text)
                shown = r.text if started else r.text.lstrip("\n")  # no blank line after the reply prefix
                started = started or bool(shown)
                click.echo(shown, nl=False)
                last = r
        except KeyboardInterrupt:
            self.messages.pop()  # drop the question too: the turn never completed
            click.echo()
            click.echo(click.style("[interrupted: reply stopped, this turn dropped from the history]", fg="yellow"))
            return None
        click.echo()
        self.messages.append({"role": "assistant", "content": "".join(parts)})
        if last is not None:
            self.totals.add(last.stats)
            click.echo(click.style(format_status(last), dim=True))
        return last


def _int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _readline() -> None:
    """Line editing and history at the prompt, where the platform has readline."""
    try:
        import readline  # noqa: F401 - importing it is what turns it on for input()
    except ImportError:
        pass


def run_chat(session: ChatSession, *, read: Callable[[str], str] = input,
             generate: Callable[..., Iterable[Any]] | None = None) -> None:
    """The loop. ``read`` and ``generate`` are injectable for tests."""
    if generate is None:
        import mtplx

        generate = mtplx.stream_generate
    if read is input:
        _readline()
    click.echo(f"Chat: {session.settings()}. Type /help for commands, /quit or Ctrl-D to leave.")
    while True:
        try:
            line = read(PROMPT)
        except KeyboardInterrupt:
            click.echo()
            click.echo(INTERRUPT_HINT)
            continue
        except EOFError:
            click.echo()
            break
        parsed = parse_command(line)
        try:
            if parsed is not None:
                click.echo(session.command(*parsed))
            elif line.strip():
                session.reply(line.strip(), generate)
        except Quit:
            break
        except KeyboardInterrupt:  # landed between two replies' bookkeeping: just carry on
            click.echo()
            click.echo(INTERRUPT_HINT)
    click.echo(GOODBYE)
