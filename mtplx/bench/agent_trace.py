"""`mtplx bench --agent-trace FILE`: replay a recorded coding-agent session through the prompt cache.

A trace is what an agent sent, request by request (the format: docs/agent-traces.md). Each
request is the whole conversation up to that turn (system prompt, user messages, the assistant's
tool calls, the tool results) with its tools and max_tokens. The replay sends them in order down
the path the server takes for a chat request: the chat template renders messages and tools
(:func:`mtplx.generation.chat_template.chat_ids`, as ``Core.encode_chat``), the reuse boundaries
say where the next turn may diverge, a :class:`PromptCacheLRU` hands out the cache serving the
longest prefix, and the engine prefills only what the cache does not hold.

The recorded replies, not the model's, go into the next request (the trace is replayed as it was
recorded), so a turn reuses the previous prompt up to its end-of-prompt snapshot and prefills the
recorded reply with what followed it; a live session would also hold the reply's own tokens.

A second pass replays the same requests "as after a restart": the memory tier is dropped and
the disk tier kept (:func:`restarted_store`): its folder, read afresh by a new disk tier, as a
restarted server reads it. Time to first token counts the checkout, where a disk tier loads its
file (on the engine thread, as in the server).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mtplx.api import reuse_boundaries
from mtplx.engine.prompt_cache import PromptCacheLRU, common_prefix, model_identity
from mtplx.engine.prompt_cache_disk import PromptCacheDisk, default_max_bytes
from mtplx.errors import MtplxError
from mtplx.generation.chat_template import chat_ids
from mtplx.generation.prompts import EncodedPrompt

SAMPLE = "sample"  # `--agent-trace sample`: the trace shipped in mtplx/data
SAMPLE_FILE = Path(__file__).resolve().parents[1] / "data" / "agent_trace_sample.json"
DEFAULT_MAX_TOKENS = 128  # a request without max_tokens
MEMORY_TIER_BYTES = 4 << 30  # the replay's prompt-cache memory tier: holds every snapshot of a session
ROLES = ("system", "developer", "user", "assistant", "tool")


class TraceError(MtplxError):
    """A trace file that cannot be replayed; the message names the file and the field."""


@dataclass
class TraceRequest:
    """One request, as the chat template reads it (tool-call arguments as objects)."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    max_tokens: int


@dataclass
class Trace:
    path: str
    name: str
    requests: list[TraceRequest]
    meta: dict[str, Any] = field(default_factory=dict)


def trace_path(ref: str) -> Path:
    """``sample`` is the shipped trace; anything else a file."""
    return SAMPLE_FILE if ref == SAMPLE else Path(ref).expanduser()


def load_trace(ref: str) -> Trace:
    """Read and check a trace file (a JSON list of requests, or an object with ``requests``)."""
    path = trace_path(ref)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TraceError(f"no trace file at {path}", fix="pass an existing JSON file, or 'sample' for the shipped "
                                                          "trace") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TraceError(f"{path} is not a readable JSON file ({e})",
                         fix="write the trace as UTF-8 JSON: see docs/agent-traces.md") from None
    meta: dict[str, Any] = {}
    if isinstance(data, dict):
        meta = {k: v for k, v in data.items() if k != "requests"}
        data = data.get("requests")
        where = "requests"
    else:
        where = "the top level"
    if not isinstance(data, list) or not data:
        raise TraceError(f"{path}: {where} is not a non-empty list of requests",
                         fix="give a JSON list of {\"messages\": [...], \"tools\": [...], \"max_tokens\": N}, or an "
                             "object whose \"requests\" is that list")
    requests = [_request(r, f"{path}: requests[{i}]") for i, r in enumerate(data)]
    return Trace(str(path), str(meta.get("name") or path.stem), requests, meta)


def _fail(where: str, problem: str, fix: str) -> TraceError:
    return TraceError(f"{where}{problem}", fix=fix)


def _request(r: Any, where: str) -> TraceRequest:
    if not isinstance(r, dict):
        raise _fail(where, f" is a {type(r).__name__}, not an object", "give each request as {\"messages\": [...]}")
    unknown = sorted(set(r) - {"messages", "tools", "max_tokens", "note"})
    if unknown:
        raise _fail(where, f" has unknown field(s) {', '.join(unknown)}", "keep messages, tools, max_tokens and note")
    messages = r.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _fail(where, ".messages is not a non-empty list", "give the conversation as OpenAI chat messages")
    tools = r.get("tools")
    if tools is not None and (not isinstance(tools, list)
                              or not all(isinstance(t, dict) and isinstance(t.get("function"), dict)
                                         and isinstance(t["function"].get("name"), str) for t in tools)):
        raise _fail(where, ".tools is not a list of function tools",
                    "give OpenAI tools: [{\"type\": \"function\", \"function\": {\"name\": ..., \"parameters\": ...}}]")
    max_tokens = r.get("max_tokens", DEFAULT_MAX_TOKENS)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise _fail(where, f".max_tokens is {max_tokens!r}", "give a positive integer")
    return TraceRequest([_message(m, f"{where}.messages[{i}]") for i, m in enumerate(messages)], tools or None,
                        max_tokens)


def _message(m: Any, where: str) -> dict[str, Any]:
    """An OpenAI chat message -> what the chat template reads, as mtplx.server.openai maps it
    (the server is above bench: its rules are repeated here, not imported): text parts joined
    with newlines, "developer" read as "system", tool-call arguments parsed into objects."""
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        raise _fail(where, f" has role {m.get('role') if isinstance(m, dict) else m!r}",
                    f"use one of {', '.join(ROLES)}")
    content = m.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise _fail(where, ".content has a part that is not text", "give text parts {\"type\": \"text\", ...}")
        content = "\n".join(p["text"] for p in content)
    elif content is None:
        content = ""
    elif not isinstance(content, str):
        raise _fail(where, f".content is a {type(content).__name__}", "give a string or a list of text parts")
    out: dict[str, Any] = {"role": "system" if m["role"] == "developer" else m["role"], "content": content}
    calls = m.get("tool_calls")
    if calls:
        if m["role"] != "assistant" or not isinstance(calls, list):
            raise _fail(where, ".tool_calls is not a list on an assistant message", "only assistants call tools")
        out["tool_calls"] = [_tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]
    for key in ("tool_call_id", "reasoning_content", "name"):
        if isinstance(m.get(key), str):
            out[key] = m[key]
    return out


def _tool_call(c: Any, where: str) -> dict[str, Any]:
    fn = c.get("function") if isinstance(c, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise _fail(where, " has no function name", "give {\"function\": {\"name\": ..., \"arguments\": \"{...}\"}}")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise _fail(where, f".function.arguments is not JSON ({e})", "give the arguments as a JSON object") from None
    if not isinstance(args, dict):
        raise _fail(where, ".function.arguments is not a JSON object", "give the arguments as a JSON object")
    return {"id": c.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": args}}


# -- the replay --------------------------------------------------------------------------------

@dataclass
class Turn:
    turn: int
    prompt_tokens: int
    cached_tokens: int = 0
    encode_s: float = 0.0  # the chat template and the reuse boundaries (the server's tokenizer thread)
    checkout_s: float = 0.0  # the prompt cache's checkout (a disk tier's load)
    prefill_s: float = 0.0
    ttft_s: float = 0.0  # from the call to the first token: prefill of what the cache lacks + first sample
    decode_tps: float = 0.0
    generated: int = 0
    skipped: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"turn": self.turn, "prompt_tokens": self.prompt_tokens}
        if self.skipped:
            return {**out, "skipped": self.skipped}
        return {**out, "cached_tokens": self.cached_tokens, "prefilled_tokens": self.prompt_tokens - self.cached_tokens,
                "encode_s": round(self.encode_s, 4), "checkout_s": round(self.checkout_s, 4), "prefill_s": round(self.prefill_s, 4),
                "ttft_s": round(self.ttft_s, 4), "decode_tps": round(self.decode_tps, 2), "generated": self.generated}


@dataclass
class Pass:
    name: str
    note: str
    turns: list[Turn] = field(default_factory=list)
    disk: dict[str, int] | None = None  # the disk tier's loads and writes during the pass

    def ran(self) -> list[Turn]:
        return [t for t in self.turns if not t.skipped]

    def totals(self) -> dict[str, Any]:
        ran = self.ran()
        prompt = sum(t.prompt_tokens for t in ran)
        cached = sum(t.cached_tokens for t in ran)
        return {"turns": len(ran), "skipped": len(self.turns) - len(ran), "prompt_tokens": prompt,
                "cached_tokens": cached, "cached_share": round(cached / prompt, 4) if prompt else 0.0,
                "prefill_s": round(sum(t.prefill_s for t in ran), 3), "ttft_s": round(sum(t.ttft_s for t in ran), 3)}

    def table(self) -> str:
        head = (f"{'turn':>4} {'prompt':>7} {'cached':>7} {'prefilled':>9} {'prefill s':>9} {'TTFT s':>8} "
                f"{'decode tok/s':>12}")
        rows = [f"{self.name}: {self.note}", head, "-" * len(head)]
        for t in self.turns:
            if t.skipped:
                rows.append(f"{t.turn:>4} {t.prompt_tokens:>7} skipped: {t.skipped}")
                continue
            rows.append(f"{t.turn:>4} {t.prompt_tokens:>7} {t.cached_tokens:>7} {t.prompt_tokens - t.cached_tokens:>9} "
                        f"{t.prefill_s:>9.3f} {t.ttft_s:>8.3f} {t.decode_tps:>12.1f}")
        s = self.totals()
        rows.append(f"{'all':>4} {s['prompt_tokens']:>7} {s['cached_tokens']:>7} "
                    f"{s['prompt_tokens'] - s['cached_tokens']:>9} {s['prefill_s']:>9.3f} {s['ttft_s']:>8.3f}")
        return "\n".join(rows)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "note": self.note, "turns": [t.as_dict() for t in self.turns],
                "totals": self.totals(), "disk": self.disk}


@dataclass
class AgentTraceReport:
    trace: str
    path: str
    requests: int
    depth: int | str
    temperature: float
    max_context: int
    system_tokens: int
    passes: list[Pass] = field(default_factory=list)

    def table(self) -> str:
        return "\n\n".join(p.table() for p in self.passes) + "".join(f"\n{line}" for line in self.verdicts())

    def verdicts(self) -> list[str]:
        out = [f"{p.name}: disk tier {d['loads']} load(s), {d['writes']} write(s), {d['writes_dropped']} write(s) "
               f"dropped (queue full)" for p in self.passes if (d := p.disk)]
        if len(self.passes) == 2:
            first, again = (p.turns[0] for p in self.passes)
            if not first.skipped and not again.skipped and first.ttft_s > 0:
                out.append(f"turn 1 after the restart: time to first token {again.ttft_s:.3f} s, {again.cached_tokens} "
                           f"of {again.prompt_tokens} tokens cached, against {first.ttft_s:.3f} s on the first run "
                           f"({again.ttft_s / first.ttft_s:.3g}x)")
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"trace": self.trace, "path": self.path, "requests_in_trace": self.requests, "depth": self.depth,
                "temperature": self.temperature, "max_context": self.max_context,
                "system_tokens": self.system_tokens, "passes": [p.as_dict() for p in self.passes],
                "verdicts": self.verdicts()}


def make_store(model: Any, max_bytes: int = MEMORY_TIER_BYTES, disk_dir: str | Path | None = None) -> PromptCacheLRU:
    """The prompt caches of a freshly started server: its memory tier, empty, and with
    ``disk_dir`` the disk tier in that folder (bounded as the server bounds it)."""
    if disk_dir is None:
        return PromptCacheLRU(model, max_bytes)
    disk = PromptCacheDisk(disk_dir, model_identity(model), default_max_bytes(Path(disk_dir)))
    return PromptCacheLRU(model, max_bytes, disk=disk)


def restarted_store(model: Any, store: PromptCacheLRU, max_bytes: int = MEMORY_TIER_BYTES) -> tuple[PromptCacheLRU, str]:
    """The store a server restarted after ``store`` starts with, and the note the report prints:
    the memory tier dropped, the disk tier's folder kept. ``store`` is stopped as a server stops
    (its queued disk writes finished); the new tier reads the folder afresh, as a new process."""
    disk = store.disk
    store.close()
    if isinstance(disk, PromptCacheDisk):
        return (make_store(model, max_bytes, disk.root),
                f"memory tier dropped, disk tier kept ({disk.root}): the server restarted")
    return make_store(model, max_bytes), ("no disk tier (--prompt-cache-dir none): nothing survives the restart, "
                                          "this pass starts from an empty cache")


def disk_stats(store: PromptCacheLRU) -> dict[str, int] | None:
    disk = store.disk
    if not isinstance(disk, PromptCacheDisk):
        return None
    return {"loads": store.disk_hits, "writes": disk.writes, "writes_dropped": disk.dropped, "refused": disk.refused}


def encode_request(tokenizer: Any, req: TraceRequest, enable_thinking: bool | None = None) -> EncodedPrompt:
    """The request's ids and reuse boundaries, as the server's ``Core.encode_chat`` makes them."""
    kwargs = {"tools": req.tools} if req.tools else {}
    ids = chat_ids(tokenizer, req.messages, enable_thinking, generation_prompt=True, **kwargs)
    return EncodedPrompt(ids, tuple(reuse_boundaries(tokenizer, req.messages, ids, enable_thinking, **kwargs)))


def system_tokens(tokenizer: Any, req: TraceRequest) -> int:
    """Tokens of the request's system turn as the template renders it (its system messages and
    tools, up to the first user message): the common prefix of two renderings that differ only
    in the user's text (a token or two of the user turn's header included)."""
    lead = []
    for m in req.messages:
        if m["role"] != "system":
            break
        lead.append(m)
    kwargs = {"tools": req.tools} if req.tools else {}
    a, b = (chat_ids(tokenizer, [*lead, {"role": "user", "content": x}], None, generation_prompt=False, **kwargs)
            for x in ("a", "b"))
    return common_prefix(a, b)


def replay_pass(model: Any, tokenizer: Any, requests: list[TraceRequest], store: PromptCacheLRU, name: str,
                note: str, *, depth: int | str, temperature: float, seed: int, max_tokens: int | None,
                progress: Callable[[str], None] | None = None) -> Pass:
    import mtplx

    out = Pass(name, note)
    for i, req in enumerate(requests, 1):
        t0 = time.perf_counter()
        prompt = encode_request(tokenizer, req)
        encode_s = time.perf_counter() - t0
        n = len(prompt.ids)
        if n >= model.max_context:
            out.turns.append(Turn(i, n, skipped=f"the prompt's {n} tokens do not fit the model's context of "
                                                f"{model.max_context} (a model whose config allows more: docs/agent-traces.md)"))
            if progress:
                progress(f"{name}, turn {i}: skipped, {n} tokens over the context of {model.max_context}")
            continue
        budget = min(max_tokens or req.max_tokens, model.max_context - n)
        t0 = time.perf_counter()  # the checkout counts: a disk tier loads its file there
        cache = store.checkout(prompt.ids)
        checkout_s = time.perf_counter() - t0
        responses = mtplx.stream_generate(model, tokenizer, prompt, max_tokens=budget, temperature=temperature,
                                          depth=depth, seed=seed, prompt_cache=cache)
        last = next(responses)
        ttft = time.perf_counter() - t0
        for last in responses:  # noqa: B007 - the last response carries the totals
            pass
        store.checkin(cache)
        s = last.stats
        turn = Turn(i, n, cached_tokens=s.cached_tokens, encode_s=encode_s, checkout_s=checkout_s,
                    prefill_s=s.seconds["prefill"],
                    ttft_s=ttft, decode_tps=s.tokens_per_second, generated=s.generated)
        out.turns.append(turn)
        if progress:
            progress(f"{name}, turn {i}/{len(requests)}: {n} prompt tokens, {turn.cached_tokens} cached, "
                     f"prefill {turn.prefill_s:.3f} s, time to first token {ttft:.3f} s")
    return out


def replay(model: Any, tokenizer: Any, trace: Trace, *, turns: int | None = None, depth: int | str = 0,
           temperature: float = 0.0, seed: int = 0, max_tokens: int | None = None, restart: bool = True,
           cache_bytes: int = MEMORY_TIER_BYTES, disk_dir: str | Path | None = None,
           progress: Callable[[str], None] | None = None) -> AgentTraceReport:
    """Replay ``trace`` (its first ``turns`` requests) on a fresh prompt cache (a disk tier in
    ``disk_dir``, if given), then, with ``restart``, again on the store a restarted server would
    have: memory empty, the disk folder as the first pass left it. ``max_tokens`` overrides each
    request's own."""
    if turns is not None and turns < 1:
        raise MtplxError(f"turns is {turns}", fix="replay at least one request")
    requests = trace.requests[:turns]
    report = AgentTraceReport(trace.name, trace.path, len(trace.requests), depth, temperature, model.max_context,
                              system_tokens(tokenizer, requests[0]))
    kw = dict(depth=depth, temperature=temperature, seed=seed, max_tokens=max_tokens, progress=progress)
    store = make_store(model, cache_bytes, disk_dir)
    try:
        where = f" and a disk tier in {disk_dir}" if disk_dir is not None else ", memory only"
        first = replay_pass(model, tokenizer, requests, store, "first run",
                            f"a server started with an empty prompt cache{where}", **kw)
        first.disk = disk_stats(store)
        report.passes.append(first)
        if restart:
            store, note = restarted_store(model, store, cache_bytes)
            second = replay_pass(model, tokenizer, requests, store, "after a restart", note, **kw)
            second.disk = disk_stats(store)
            report.passes.append(second)
    finally:
        store.close()
    return report
