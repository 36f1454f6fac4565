"""The terminal chat of `mtplx start`: the loop, the slash commands and the status line.

Ctrl-C while a reply streams stops that reply and drops the whole turn (the question and the
partial answer) from the history, so the next question is not asked of a half-finished answer;
Ctrl-C at the prompt only prints a hint. Ctrl-D or /quit leaves. A turn that no longer fits the
model's context, or any other mistake, is said in one line and the chat goes on: a turn over
the context offers to start a new conversation with that message.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, TextIO

import click

from mtplx.core import knobs
from mtplx.cli.options import format_status
from mtplx.cli.prefill_progress import PrefillBar
from mtplx.engine.stats import AcceptanceTally
from mtplx.errors import ContextOverflowError, MtplxError

try:
    import termios
except ImportError:  # not a POSIX terminal (Windows): keystrokes are echoed as the console does
    termios = None  # type: ignore[assignment]

PROMPT = "you> "
REPLY = "mtplx> "
GOODBYE = "Bye."
INTERRUPT_HINT = "(Ctrl-C stops a reply while it streams; type /quit or press Ctrl-D to leave)"
NEW_CONVERSATION = "Start a new conversation with this message? [Y/n] "
# A turn that prefilled at least this many tokens measures the prefill rate (a few tokens' time is
# mostly fixed costs, and would make the next long prefill's estimate far too long).
MEASURED_PREFILL = 64

HELP = """\
Commands:
  /help              this list
  /reset             forget the conversation so far
  /depth N|auto      draft depth: auto = chosen each step, 0 = plain AR, N > 0 = MTP with N drafts
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
    depth: int | str  # "auto", or a pinned depth (0 = plain AR)
    thinking: bool
    max_tokens: int = 512
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    lookup: int | str = knobs.AUTO  # drafts copied from the context (mtplx.engine.lookup)
    kv_bits: int | None = None  # the attention KV stored quantized (mtplx.model.kv_quant)
    kv_group_size: int = 64
    messages: list[dict[str, str]] = field(default_factory=list)
    totals: Totals = field(default_factory=Totals)
    # The conversation's prompt cache (mtplx.make_prompt_cache) and its tokens: each turn
    # appends the new question to what the model has seen and written (mtplx/generation/conversation.py),
    # so it prefills only that. Set together (run_chat); None: every turn renders and prefills
    # the whole history.
    prompt_cache: Any = None
    conversation: Any = None
    # Where the prompt caches are also kept on disk (mtplx.engine.prompt_cache_disk), so a
    # conversation that starts as an earlier one did (the same first question) or a turn after
    # an interrupted one loads them; None: memory only. run_chat makes ``prompt_caches`` from it.
    prompt_cache_dir: Any = None
    prompt_caches: Any = None
    # Prompt tokens per second prefilled on an earlier turn: what a long prefill's bar estimates
    # with (mtplx/cli/prefill_progress.py); None until a turn prefilled enough to measure.
    prefill_rate: float | None = None

    def kv(self) -> dict[str, Any]:
        """The KV quantization's arguments, none when unquantized (the API's default)."""
        return {} if self.kv_bits is None else {"kv_bits": self.kv_bits, "kv_group_size": self.kv_group_size}

    @property
    def has_mtp(self) -> bool:
        return bool(getattr(self.model, "has_mtp", False))

    def settings(self) -> str:
        mode = ("MTP, adaptive depth (auto)" if self.depth == knobs.AUTO else
                "plain AR (depth 0)" if self.depth == 0 else f"MTP depth {self.depth}")
        temp = self.temperature
        if temp is None:  # show the value the engine will use, not "default"
            contract = getattr(self.model, "contract", None)
            temp = {**knobs.DEFAULTS, **(contract.defaults if contract else {})}["temperature"]
        temp = f"{temp:g}"
        return f"{mode}, temperature {temp}, thinking {'on' if self.thinking else 'off'}, max {self.max_tokens} tokens"

    def command(self, name: str, arg: str) -> str:
        """Run one slash command; returns what to print. Raises Quit for /quit."""
        if name in ("quit", "exit", "q"):
            raise Quit
        if name in ("help", "h", "?"):
            return HELP
        if name == "reset":
            self._forget()
            return "History cleared."
        # The knobs' limits and messages are mtplx.core.knobs', the same as the flags' and the API's.
        if name == "depth":
            try:
                n = knobs.parse("depth", arg, label="/depth")
            except knobs.KnobError as e:
                return str(e)
            if n != 0 and not self.has_mtp:
                return "This model has no MTP head loaded: only /depth 0 (plain AR) is possible."
            self.depth = n
            return f"Now: {self.settings()}."
        if name in ("temp", "temperature"):
            try:
                self.temperature = knobs.check("temperature", _number(arg), label="/temp")
            except knobs.KnobError as e:
                return str(e)
            return f"Now: {self.settings()}."
        if name in ("max", "max-tokens"):
            try:
                self.max_tokens = knobs.check("max_tokens", _number(arg), label="/max")
            except knobs.KnobError as e:
                return str(e)
            return f"Now: {self.settings()}."
        if name == "thinking":
            if arg.lower() not in ("on", "off"):
                return "Usage: /thinking on|off."
            self.thinking = arg.lower() == "on"
            return f"Now: {self.settings()}."
        if name == "stats":
            return self.totals.format()
        return f"Unknown command /{name}. Type /help for the list."

    def reply(self, text: str, generate: Callable[..., Iterable[Any]],
              read: Callable[[str], str] | None = None) -> Any:
        """Stream one answer to ``text``; returns its last response, or None if the turn did not
        complete (interrupted, over the context, refused). ``read`` asks the user whether to start
        a new conversation when the turn does not fit; without it, none is offered."""
        self.messages.append({"role": "user", "content": text})
        click.echo(click.style(REPLY, fg="cyan"), nl=False)
        try:
            with no_echo():
                return self._stream(generate)
        except ContextOverflowError as e:
            self._drop_turn()
            click.echo()
            return self._overflow(text, e, generate, read)
        except MtplxError as e:  # a mistake in this turn; the conversation itself is fine
            self._drop_turn()
            click.echo()
            click.echo(click.style(f"mtplx: error: {e}", fg="red"))
            return None
        except KeyboardInterrupt:
            self._drop_turn()  # drop the question too: the turn never completed
            click.echo()
            click.echo(click.style("[interrupted: reply stopped, this turn dropped from the history]", fg="yellow"))
            return None

    def _drop_turn(self) -> None:
        self.messages.pop()
        if self.conversation is not None:
            self.conversation.drop_turn()

    def _stream(self, generate: Callable[..., Iterable[Any]]) -> Any:
        parts: list[str] = []
        tokens: list[int] = []
        last = None
        started = False
        prompt, cache = self.messages, {}
        if self.conversation is not None:
            prompt = self.conversation.prompt(self.messages, self.thinking)
            if self.prompt_caches is not None:  # memory, else disk, else a new cache
                self.prompt_cache = self.prompt_caches.checkout(prompt)
            cache = {"prompt_cache": self.prompt_cache}
        todo = (len(prompt) - self.prompt_cache.reusable(prompt)
                if self.conversation is not None and self.prompt_cache is not None else 0)
        responses = iter(generate(self.model, self.tokenizer, prompt, max_tokens=self.max_tokens,
                                  temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, depth=self.depth,
                                  seed=self.seed, enable_thinking=self.thinking, lookup=self.lookup, **cache,
                                  **self.kv()))
        with PrefillBar(todo, self.prefill_rate) as bar:
            first = next(responses, None)  # the prefill happens here, before the first token
        if bar.shown:  # the bar drew over the reply's prefix and erased its line: put the prefix back
            click.echo(click.style(REPLY, fg="cyan"), nl=False)
        for r in itertools.chain([] if first is None else [first], responses):
            parts.append(r.text)
            if self.conversation is not None:
                tokens += r.tokens
            shown = r.text if started else r.text.lstrip("\n")  # no blank line after the reply prefix
            started = started or bool(shown)
            click.echo(shown, nl=False)
            last = r
        if self.prompt_caches is not None:
            self.prompt_caches.checkin(self.prompt_cache)  # written to disk by the tier's own thread
        click.echo()
        self.messages.append({"role": "assistant", "content": "".join(parts)})
        if self.conversation is not None:
            self.conversation.add_reply(tokens)
        if last is not None:
            self.totals.add(last.stats)
            if last.stats.prompt_tokens - last.stats.cached_tokens >= MEASURED_PREFILL:
                self.prefill_rate = last.stats.prefill_tokens_per_second or self.prefill_rate
            click.echo(click.style(format_status(last), dim=True))
        return last

    def _overflow(self, text: str, e: ContextOverflowError, generate: Callable[..., Iterable[Any]],
                  read: Callable[[str], str] | None) -> Any:
        if not self.messages:
            click.echo(click.style(f"This message alone is {e.prompt_tokens} tokens with the chat template, and the "
                                   f"model's context holds {e.context}: shorten it.", fg="yellow"))
            return None
        click.echo(click.style(f"This turn does not fit: the conversation would be {e.prompt_tokens} tokens and the "
                               f"model's context holds {e.context}. The conversation so far is kept.", fg="yellow"))
        if read is None:
            click.echo("Type /reset to start a new conversation.")
            return None
        try:
            answer = read(NEW_CONVERSATION).strip().lower()
        except (EOFError, KeyboardInterrupt):
            click.echo()
            answer = "n"
        if answer not in ("", "y", "yes"):
            click.echo("Kept the conversation; /reset starts a new one.")
            return None
        self._forget()
        click.echo("New conversation.")
        return self.reply(text, generate, read)

    def _forget(self) -> None:
        self.messages.clear()
        if self.conversation is not None:
            if self.prompt_caches is None:  # (a checked-in cache stays for a conversation that returns)
                self.prompt_cache.reset()
            self.conversation.reset()


def _number(text: str) -> Any:
    """A slash command's argument as an int, else a float, else the text itself, so the knob's
    own check says what is wrong with it (not an integer, not a number, out of range)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


@contextlib.contextmanager
def no_echo(stream: TextIO | None = None) -> Iterator[None]:
    """Terminal echo off while a reply streams, so keys pressed meanwhile do not land in the
    middle of the reply; restored afterwards, on Ctrl-C too. Does nothing unless ``stream``
    (standard input by default) is a terminal.

    What was typed meanwhile is discarded when echo comes back: it was typed blind, and sending
    it, or leaving it half-typed at the next prompt, would surprise more than losing it."""
    stream = sys.stdin if stream is None else stream
    try:
        fd = stream.fileno()
        is_tty = termios is not None and stream.isatty()
    except (AttributeError, OSError, ValueError):
        is_tty = False
    if not is_tty:
        yield
        return
    saved = termios.tcgetattr(fd)
    quiet = list(saved)
    quiet[3] &= ~termios.ECHO  # lflag; ICANON and ISIG stay, so Ctrl-C still interrupts
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcflush(fd, termios.TCIFLUSH)
        termios.tcsetattr(fd, termios.TCSANOW, saved)


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
        if session.conversation is None:
            from mtplx.generation.conversation import Conversation

            session.conversation = Conversation(session.tokenizer)
            if session.prompt_cache_dir is not None:
                session.prompt_caches = disk_store(session.model, session.prompt_cache_dir, **session.kv())
            else:
                session.prompt_cache = mtplx.make_prompt_cache(session.model, **session.kv())
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
                session.reply(line.strip(), generate, read)
        except Quit:
            break
        except KeyboardInterrupt:  # landed between two replies' bookkeeping: just carry on
            click.echo()
            click.echo(INTERRUPT_HINT)
    if session.prompt_caches is not None:
        session.prompt_caches.close()  # the last turn's cache reaches the disk
    click.echo(GOODBYE)


def disk_store(model: Any, folder: Any, **kv: Any) -> Any:
    """The chat's prompt caches: in memory (a tenth of the machine's, as `mtplx serve`) and on
    disk in ``folder`` (10 GiB or a quarter of the free disk, whichever is less); ``kv``: the
    caches' kv_bits and kv_group_size."""
    from pathlib import Path

    from mtplx.core.device import machine_memory_bytes
    from mtplx.engine.prompt_cache import PromptCacheLRU, cache_identity
    from mtplx.engine.prompt_cache_disk import PromptCacheDisk, default_max_bytes

    disk = PromptCacheDisk(folder, cache_identity(model, **kv), default_max_bytes(Path(folder)), **kv)
    return PromptCacheLRU(model, int(machine_memory_bytes() * 0.1), disk=disk, **kv)
