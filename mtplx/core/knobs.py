"""The decoding knobs and their limits, defined once.

The CLI, the Python API, the server and the chat all validate what a user sets through these
functions, so a value means the same thing (and is refused with the same sentence) everywhere.
A refused value raises :class:`KnobError`: an :class:`MtplxError` (one clear paragraph, never
labelled a bug) that is also a ``ValueError`` and carries the knob's name in ``param``, which
the server reports as OpenAI's ``error.param``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Iterable

from mtplx.errors import MtplxError

# Deeper drafts are accepted too rarely to pay off; the contract's schema says the same.
MAX_DEPTH = 8
# numpy's generator takes any non-negative integer; JSON clients rarely go past 64 bits.
MAX_SEED = 2**64 - 1
# The depth value that lets the engine choose each step's depth (mtplx.engine.policy.AutoDepth).
AUTO = "auto"
# The deepest depth "auto" considers unless `mtplx tune --max-depth` measured further: its cost
# model is measured at T = 1..AUTO_MAX_DEPTH+1, and deeper drafts are rarely accepted.
AUTO_MAX_DEPTH = 3

# Strict greedy's default near-tie margin (mtplx.engine.strict): a top-2 logit gap at or under this
# can flip between a verify row and a decode step (bf16 logits of a 4-bit trunk round by about 1e-2
# between kernels). `mtplx doctor --exactness` calls the same gap a near-tie (its TIE_FLOOR).
NEAR_TIE = 0.05

# Prompt tokens per prefill pass: a long prompt is fed in pieces of at most this many tokens, which
# bounds a pass's activations and, in a batch, what a joining prompt adds to the running rows'
# step (their longest wait between two tokens). The one chunk size of every decoding path (a row's
# chunking changes no token on the CPU backend, but a GPU's kernels may round pieces of different
# sizes differently). Chosen by measurement (docs/batching.md, `mtplx bench --concurrency 4
# --join-tokens 4000 --prefill-chunk ...`): on MLX's CPU backend a prompt token costs the same in
# a 64-token pass as in a 2,048-token one, and 64 keeps the running rows' worst gap under a second
# while a 4,000-token prompt joins them; a GPU prefills tens of times faster, and there mlx-lm's own
# 2,048 keeps its passes efficient.
CPU_PREFILL_CHUNK = 64
GPU_PREFILL_CHUNK = 2048


def __getattr__(name: str) -> Any:
    # PREFILL_CHUNK asks MLX for its backend: only when read (by the decoding modules, which
    # import MLX anyway), so a command that never decodes starts without MLX.
    if name == "PREFILL_CHUNK":
        from mtplx.core.device import backend

        value = CPU_PREFILL_CHUNK if backend() == "cpu" else GPU_PREFILL_CHUNK
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


MAX_PREFILL_CHUNK = 1 << 16

# A cold prefill gives the MTP head's cache rows for the last HEAD_WINDOW positions of the prompt
# only (docs/performance.md, "The head's window"). A head row needs the trunk's last layer at its
# position, which a prefill for the trunk alone never computes (only the caches are read): on a
# long prompt the last attention layer's attention over the whole context is what the head costs.
# The head attends to its own rows only, by relative position, so a window changes acceptance,
# never the output. 0: every position. MTPLX_HEAD_WINDOW overrides it (for measuring). 2,048 by
# measurement (`mtplx bench --model <bf16 graft> --prefill 4k --head-windows 0,2048,512,128`): on
# the fixture's 4K context the head's greedy agreement after the prompt was 0.635 with every
# row, 0.620 with the last 2,048, 0.486 with 512 (the head reads repeats far back).
DEFAULT_HEAD_WINDOW = 2048


def head_window() -> int:
    """The head's window for a cold prefill (0: the whole prompt); MTPLX_HEAD_WINDOW if set."""
    import os

    text = os.environ.get("MTPLX_HEAD_WINDOW")
    if text is None:
        return DEFAULT_HEAD_WINDOW
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise KnobError("head_window", f"MTPLX_HEAD_WINDOW={text!r} is not a number of tokens",
                        fix="set it to 0 (the whole prompt) or a positive token count, or unset it")
    return value


# How the trunk's attention KV may be stored (mtplx/model/kv_quant.py): full precision (None), or
# kv_bits-bit groups of one of KV_GROUP_SIZES values along the head dimension.
KV_BITS = (8, 4)
KV_GROUP_SIZES = (32, 64, 128)
DEFAULT_KV_GROUP_SIZE = 64
# The most tokens one step may copy from the context (mtplx.engine.lookup; the ceiling).
MAX_LOOKUP = 32

# What a knob is when neither the request nor the artifact's contract sets it: the one place
# these numbers are written (CLI help, API, chat, graft, the probe and legacy contracts read it).
DEFAULTS: dict[str, Any] = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0, "depth": AUTO, "lookup": AUTO}
# The fixed depth a new artifact's contract records (what "MTP at a depth I choose" starts at).
CONTRACT_DEPTH = 2


class KnobError(MtplxError, ValueError):
    """A decoding setting outside its allowed range or of the wrong type."""

    def __init__(self, param: str, message: str, fix: str | None = None):
        self.param = param
        super().__init__(message, fix=fix)


@dataclass(frozen=True)
class Knob:
    name: str
    kind: type  # int or float
    low: float
    high: float | None = None
    low_open: bool = False  # (low, ...] rather than [low, ...]
    meaning: str = ""
    high_text: str | None = None  # how to print ``high`` when its digits would not help
    words: tuple[str, ...] = ()  # strings accepted besides numbers ("auto" for depth)
    # Numbers outside the range that mean an in-range value: top_k -1 is "no top-k" in vLLM's API
    # (and OpenAI clients send it), which mtplx writes 0. Accepted alike by every surface.
    aliases: tuple[tuple[float, float], ...] = ()

    def describe(self) -> str:
        left = "(" if self.low_open else "["
        if self.high is None:
            right = "inf)"
        else:
            right = (self.high_text or (f"{int(self.high)}" if self.kind is int else f"{self.high:g}")) + "]"
        what = "an integer" if self.kind is int else "a number"
        also = "".join(f" or {w!r}" for w in self.words)
        return f"{what} in {left}{self.low:g}, {right}{also}"

    def check(self, value: Any, label: str | None = None) -> Any:
        """The value as the knob's type, or :class:`KnobError`. ``label`` is what the user typed
        to set it (``--top-p``, ``/temp``), used in the message instead of the knob's name."""
        who = label or self.name
        fix = f"pass {self.describe()}{self.meaning}"
        if isinstance(value, str) and value.strip().lower() in self.words:
            return value.strip().lower()
        if self.kind is int:
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                also = "".join(f" or {w!r}" for w in self.words)
                raise KnobError(self.name, f"{who} must be an integer{also}, got {value!r}", fix=fix)
            value = int(value)
        else:
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise KnobError(self.name, f"{who} must be a number, got {value!r}", fix=fix)
            value = float(value)
            if not math.isfinite(value):
                raise KnobError(self.name, f"{who} must be a finite number, got {value}", fix=fix)
        for alias, meant in self.aliases:
            if value == alias:
                return self.kind(meant)
        too_low = value <= self.low if self.low_open else value < self.low
        too_high = self.high is not None and value > self.high
        if too_low or too_high:
            raise KnobError(self.name, f"{who} must be {self.describe()}, got {value!r}", fix=fix)
        return value


KNOBS: dict[str, Knob] = {k.name: k for k in (
    Knob("depth", int, 0, MAX_DEPTH, words=(AUTO,),
         meaning=" (0 = plain autoregressive decoding, 'auto' = chosen each step by measured cost and acceptance)"),
    Knob("max_tokens", int, 1),
    Knob("temperature", float, 0.0, meaning=" (0 = greedy)"),
    Knob("draft_temperature", float, 0.0, meaning=" (the law the head drafts from; any value stays exact)"),
    Knob("top_p", float, 0.0, 1.0, low_open=True, meaning=" (1 disables it)"),
    Knob("top_k", int, 0, meaning=" (0 or -1 disables it)", aliases=((-1, 0),)),
    Knob("min_p", float, 0.0, 1.0, meaning=" (0 disables it)"),
    Knob("seed", int, 0, MAX_SEED, high_text="2**64-1"),
    Knob("prefill_chunk", int, 1, MAX_PREFILL_CHUNK, meaning=" (prompt tokens per prefill pass)"),
    Knob("lookup", int, 0, MAX_LOOKUP, words=(AUTO,),
         meaning=" (tokens copied from the context per step: 0 = off, 'auto' = chosen each step by cost and acceptance)"),
)}


def check(name: str, value: Any, label: str | None = None) -> Any:
    """Validate one knob; ``None`` (meaning "the default") passes through. ``label`` names the
    setting as the user wrote it (a flag, a slash command) in the message."""
    return None if value is None else KNOBS[name].check(value, label)


def parse(name: str, text: Any, label: str | None = None) -> Any:
    """A knob typed as text (a CLI flag, a chat command, a config file): numbers are read as
    the knob's type, then checked like any value; ``None`` passes through."""
    if not isinstance(text, str):
        return check(name, text, label)
    knob, word = KNOBS[name], text.strip()
    value: Any = word
    if word.lower() not in knob.words:
        try:
            value = int(word) if knob.kind is int else float(word)
        except ValueError:
            pass  # refused by check() with the knob's own sentence
    return knob.check(value, label)


def check_all(**values: Any) -> dict[str, Any]:
    """Validate several knobs by name; returns them converted (``None`` kept as is)."""
    unknown = sorted(set(values) - set(KNOBS))
    if unknown:
        raise TypeError(f"unknown decoding knob(s): {', '.join(unknown)}")
    return {name: check(name, value) for name, value in values.items()}


def check_token_ids(ids: Iterable[Any], vocab_size: int, param: str = "prompt") -> list[int]:
    """Token ids as ints, each in [0, vocab_size): an id outside the embedding table would read
    memory past it (a crash on some backends, garbage on others), so nothing touches the model
    before this check."""
    out = []
    for i, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise KnobError(param, f"token {i} of the prompt is {t!r}, not an integer token id",
                            fix=f"pass token ids in [0, {vocab_size})")
        t = int(t)
        if not 0 <= t < vocab_size:
            raise KnobError(param, f"token {i} of the prompt is id {t}, outside this model's vocabulary "
                                   f"[0, {vocab_size})", fix="pass ids produced by this model's tokenizer")
        out.append(t)
    return out


def check_kv(kv_bits: Any, kv_group_size: Any = DEFAULT_KV_GROUP_SIZE) -> tuple[int | None, int]:
    """``(kv_bits, kv_group_size)`` as ints, or :class:`KnobError` naming the argument."""
    if kv_bits is not None and (isinstance(kv_bits, bool) or kv_bits not in KV_BITS):
        raise KnobError("kv_bits", f"kv_bits must be None, 8 or 4, got {kv_bits!r}",
                        fix="pass kv_bits=None (full-precision KV), 8 or 4 (--kv-bits none|8|4)")
    if isinstance(kv_group_size, bool) or kv_group_size not in KV_GROUP_SIZES:
        raise KnobError("kv_group_size", f"kv_group_size must be 32, 64 or 128, got {kv_group_size!r}",
                        fix="pass kv_group_size=64 (the default), 32 or 128 (--kv-group-size)")
    return (None if kv_bits is None else int(kv_bits)), int(kv_group_size)
