"""`mtplx bench --workload rewrite`: a file or a tool result handed back with one small change,
decoded four ways in one run.

The work drafts copied from the context (prompt lookup, mtplx/engine/lookup.py) are for: most
of the reply is already in the prompt. Each prompt (mtplx/data/rewrite_prompts.json, or a file
of the same shape) is decoded

- AR: depth 0, lookup 0 (the pipelined plain lane);
- MTP: depth auto, lookup 0 (the head's drafts only);
- lookup: depth 0 with a forced copy length (lookup "auto" copies only in a row that speculates,
  so at depth 0 it would copy nothing);
- both: depth auto with the bench's --lookup (auto by default: the cost model picks per step).

The ways run on the same prompt one after the other, in an order rotated from prompt to prompt
so no way always runs first, each from its own copy of one prefilled prompt cache (the prefill
is shared: the figures are decode only, and a rewrite prompt costs tens of seconds to prefill on
a CPU). Every way is exact, so at temperature 0 all four emit the same tokens; the report says
whether they did.

The "copied" figure says what the output was: the share of its tokens that the latest earlier
occurrence of the longest n-gram (n in lookup.NGRAMS) ending just before them predicts (the lookup
index's own rule), split by where that occurrence lies: in the prompt (the reply copying the file it was
given, a rewrite) or earlier in the reply (the model repeating itself: a loop). A small model
loops; a copy from its own loop speeds it up as much as a faithful rewrite would, and the report
says which one it measured.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mtplx.core import knobs
from mtplx.engine.lookup import NGRAMS
from mtplx.engine.sampling import SamplingParams
from mtplx.engine.stats import AcceptanceTally, DecodeStats
from mtplx.errors import MtplxError

PROMPTS_FILE = Path(__file__).resolve().parents[1] / "data" / "rewrite_prompts.json"
# The lookup way's copy length when --lookup is auto: a forced length (auto at depth 0 copies
# nothing), under the engine's ceiling for auto (lookup.MAX_COPY): a rewrite's copies run long.
FORCED_COPY = 8
# The share of output tokens a copy from the prompt predicts from which the output is called a
# rewrite (a faithful one of a file is most of it); below it, its copies' speed-up is no rewrite's.
REWRITE_SHARE = 0.5
# The index's sizes as the report names them ("12- or 2-gram"): they follow lookup.NGRAMS.
_GRAMS = " or ".join(f"{n}-" for n in sorted(set(NGRAMS), reverse=True)) + "gram"


class RewritePromptError(MtplxError):
    """A rewrite prompts file that cannot be used; the message names the file and the field."""


@dataclass
class RewritePrompt:
    name: str
    kind: str
    change: str
    messages: list[dict[str, str]] | list[int]  # chat messages (thinking off), or token ids
    reference: str | None = None  # the reply a faithful model gives (the replay walks it: lookup_replay.py)


@dataclass
class Way:
    name: str
    depth: int | str
    lookup: int | str


def ways(lookup: int | str, has_mtp: bool, depth: int | str = knobs.AUTO) -> list[Way]:
    """The four ways (two without an MTP head). ``lookup``: the bench's --lookup, N or "auto";
    ``depth``: the MTP ways' depth (auto, or a pinned depth >= 1)."""
    if lookup == 0:
        raise MtplxError("--lookup 0 leaves nothing to compare: the rewrite workload runs lookup off (AR, MTP) and on "
                         "(lookup, both) itself", fix="drop --lookup, or pass the copy length N (1-32) or auto")
    if depth == 0:
        raise MtplxError("depth 0 leaves nothing to compare: the rewrite workload runs AR (depth 0) itself, and "
                         "its MTP ways at the last of --depths", fix="end --depths with auto or a depth >= 1")
    forced = FORCED_COPY if lookup == knobs.AUTO else lookup
    out = [Way("AR", 0, 0), Way("MTP", depth, 0), Way("lookup", 0, forced), Way("both", depth, lookup)]
    return out if has_mtp else [w for w in out if w.depth == 0]


def load_prompts(path: str | Path | None = None) -> list[RewritePrompt]:
    """The shipped prompts, or a JSON file of the same shape: {"prompts": [{"name", "kind",
    "change", "messages": [{"role", "content"}, ...], optionally "reference"}, ...]}."""
    path = PROMPTS_FILE if path is None else Path(path).expanduser()
    fix = f"write it as {PROMPTS_FILE.name} is written (mtplx/data/)"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RewritePromptError(f"no rewrite prompts file at {path}", fix="pass an existing JSON file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RewritePromptError(f"{path} is not a readable JSON file ({e})", fix=fix) from None
    items = data.get("prompts") if isinstance(data, dict) else None
    if not isinstance(items, list) or not items:
        raise RewritePromptError(f"{path}: 'prompts' must be a non-empty list", fix=fix)
    out = []
    for i, p in enumerate(items):
        where = f"{path}: prompts[{i}]"
        if not isinstance(p, dict):
            raise RewritePromptError(f"{where} is not an object", fix=fix)
        msgs = p.get("messages")
        if (not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs)):
            raise RewritePromptError(f"{where}.messages must be a non-empty list of {{role, content}} strings", fix=fix)
        text = {k: p.get(k, "") for k in ("name", "kind", "change", "reference")}
        if not all(isinstance(v, str) for v in text.values()):
            raise RewritePromptError(f"{where}: name, kind, change and reference must be strings", fix=fix)
        out.append(RewritePrompt(name=text["name"] or f"prompt {i + 1}", kind=text["kind"], change=text["change"],
                                 messages=msgs, reference=text["reference"] or None))
    return out


def copied(prompt: list[int], output: list[int], ngrams: tuple[int, ...] = NGRAMS) -> tuple[int, int]:
    """(tokens of ``output`` predicted from the prompt, from the output's own earlier tokens):
    a token counts when the latest earlier occurrence of the longest n-gram ending just before
    it (n in ``ngrams``, longest first, as lookup.ContextIndex proposes) was followed by it."""
    sizes = sorted(set(ngrams), reverse=True)
    tables: list[dict[tuple[int, ...], int]] = [{} for _ in sizes]
    toks: list[int] = []
    from_prompt = from_self = 0

    def push(t: int) -> None:
        i = len(toks)
        for n, table in zip(sizes, tables):
            if i >= n:
                table[tuple(toks[i - n : i])] = i
        toks.append(t)

    for t in prompt:
        push(t)
    for t in output:
        for n, table in zip(sizes, tables):
            at = table.get(tuple(toks[-n:])) if len(toks) >= n else None
            if at is not None:
                if toks[at] == t:
                    if at < len(prompt):
                        from_prompt += 1
                    else:
                        from_self += 1
                break
        push(t)
    return from_prompt, from_self


@dataclass
class WayResult:
    way: Way
    runs: list[DecodeStats] = field(default_factory=list)
    outputs: list[list[int]] = field(default_factory=list)
    texts: list[str | None] = field(default_factory=list)  # the outputs decoded (None: no tokenizer)
    from_prompt: int = 0
    from_self: int = 0

    def total(self, name: str) -> int:
        return sum(getattr(r, name) for r in self.runs)

    @property
    def tps(self) -> float:
        """Generated tokens over decode time, pooled over the prompts (prefill excluded)."""
        seconds = sum(r.decode_seconds for r in self.runs)
        return self.total("generated") / seconds if seconds > 0 else 0.0

    @property
    def tokens_per_step(self) -> float:
        steps = self.total("steps")
        return self.total("generated") / steps if steps else 0.0

    @property
    def mtp_acceptance(self) -> list[float]:
        tally = AcceptanceTally()
        for r in self.runs:
            tally.add(r)
        return [a / d for a, d in zip(tally.accepted, tally.drafted) if d]

    @property
    def lookup_acceptance(self) -> float | None:
        drafted = self.total("lookup_drafted")
        return self.total("lookup_accepted") / drafted if drafted else None

    @property
    def copied_share(self) -> tuple[float, float]:
        n = self.total("generated")
        return (self.from_prompt / n, self.from_self / n) if n else (0.0, 0.0)


@dataclass
class RewriteReport:
    model: str
    device: str
    params: SamplingParams
    max_tokens: int
    prompts: list[RewritePrompt]
    results: dict[str, WayResult]

    def ratio(self, name: str) -> float:
        ar = self.results["AR"].tps
        return self.results[name].tps / ar if ar else float("nan")

    def ratios(self, name: str) -> list[float]:
        """Prompt by prompt against AR (the same prompt, so its own speed cancels)."""
        return [r.tokens_per_second / a.tokens_per_second
                for r, a in zip(self.results[name].runs, self.results["AR"].runs) if a.tokens_per_second > 0]

    @property
    def same_tokens(self) -> bool | None:
        """Greedy only: whether every way emitted AR's tokens for every prompt (None when sampling)."""
        if not self.params.greedy:
            return None
        ar = self.results["AR"].outputs
        return all(r.outputs == ar for r in self.results.values())

    def header(self) -> str:
        n = len(self.prompts)
        return (f"mtplx bench --workload rewrite: {self.model} on {self.device}; {n} prompt{'s' * (n != 1)} "
                f"(a file or a tool result handed back with one change), {self.max_tokens} tokens at most, "
                f"temperature {self.params.temperature:g}; decode tok/s over all prompts (prefill shared and excluded)")

    def table(self) -> str:
        head = (f"{'way':<7} {'depth':>5} {'lookup':>6} {'tok/s':>7} {'vs AR':>6} {'tok/step':>8}  "
                f"{'MTP acceptance':<16} {'copy acc':>8}  {'tokens from copy/MTP/sampled':<28} "
                f"{'copyable: prompt/own':>20}")
        rows = [head, "-" * len(head)]
        for name, r in self.results.items():
            w = r.way
            mtp = " ".join(f"{a:.2f}" for a in r.mtp_acceptance) or "-"
            look = "-" if r.lookup_acceptance is None else f"{r.lookup_acceptance:.2f}"
            src = f"{r.total('from_lookup')}/{r.total('from_mtp')}/{r.total('from_sampled')}"
            p, s = r.copied_share
            rows.append(f"{name:<7} {w.depth!s:>5} {w.lookup!s:>6} {r.tps:>7.2f} {self.ratio(name):>5.2f}x "
                        f"{r.tokens_per_step:>8.2f}  {mtp:<16} {look:>8}  {src:<28} "
                        f"{f'{100 * p:.0f}% / {100 * s:.0f}%':>20}")
        return "\n".join(rows)

    def verdicts(self) -> list[str]:
        from mtplx.bench.runner import noise_note

        lines = ["copyable: the share of output tokens that the latest earlier occurrence of the longest "
                 f"{_GRAMS} before them predicts, found in the prompt (the reply copying what it was given) or earlier "
                 "in the reply itself (the model repeating its own tokens)."]
        same = self.same_tokens
        if same is not None:
            lines.append(f"Greedy: every way emitted the same tokens as AR for every prompt: {'yes' if same else 'NO'}.")
        # The way that copied the most tells what the copies were worth.
        copying = [r for r in self.results.values() if r.total("from_lookup")]
        if copying:
            best = max(copying, key=lambda r: r.total("from_lookup"))
            p, s = best.copied_share
            name, x = best.way.name, self.ratio(best.way.name)
            if p >= REWRITE_SHARE:
                lines.append(f"The output copied its prompt ({100 * p:.0f}% of its tokens): '{name}' at {x:.2f}x AR "
                             "is a rewrite's speed-up.")
            else:
                lines.append(f"The output is no rewrite of its prompt: {100 * p:.0f}% of its tokens copy the prompt, "
                             f"{100 * s:.0f}% repeat the reply's own earlier tokens (the model looping). The copies "
                             f"came from {'those repeats' if s > p else 'what little matched'}, so '{name}' at "
                             f"{x:.2f}x AR is no rewrite's speed-up; measure that on a model that follows the "
                             "instruction.")
        else:
            lines.append("No way copied a token: the outputs gave the copy source nothing to match.")
        if len(self.prompts) < 2:
            lines.append("One prompt: no prompt-by-prompt spread to tell the ratios to AR from the machine's noise.")
        else:
            for name in self.results:
                note = noise_note(self.ratios(name), "AR") if name != "AR" else None
                if note:
                    lines.append(f"{name}: {note}.")
        return lines

    def as_dict(self) -> dict[str, Any]:
        ways = {}
        for name, r in self.results.items():
            p, s = r.copied_share
            ways[name] = {
                "depth": r.way.depth, "lookup": r.way.lookup,
                "tokens_per_second": round(r.tps, 3), "vs_ar": round(self.ratio(name), 4),
                "tokens_per_second_per_prompt": [round(x.tokens_per_second, 3) for x in r.runs],
                "generated": r.total("generated"), "steps": r.total("steps"),
                "tokens_per_step": round(r.tokens_per_step, 4),
                "mtp_acceptance": [round(a, 4) for a in r.mtp_acceptance],
                "lookup_acceptance": None if r.lookup_acceptance is None else round(r.lookup_acceptance, 4),
                "tokens_from": {"lookup": r.total("from_lookup"), "mtp": r.total("from_mtp"),
                                "sampled": r.total("from_sampled")},
                "texts": r.texts,
                "copyable": {"from_prompt": r.from_prompt, "from_own_output": r.from_self,
                             "share_from_prompt": round(p, 4), "share_from_own_output": round(s, 4)},
            }
        return {"model": self.model, "device": self.device, "sampler": vars(self.params),
                "max_tokens": self.max_tokens, "prompts": [p.name for p in self.prompts],
                "copyable_means": ("share of output tokens that the latest earlier occurrence of the longest "
                                   f"{_GRAMS} before them predicts: from the prompt (a rewrite copying its input) or "
                                   "from the output's own earlier tokens (the model repeating itself)"),
                "same_tokens_as_ar": self.same_tokens, "ways": ways, "verdicts": self.verdicts()}


def run_rewrite(model: Any, tokenizer: Any, prompts: list[RewritePrompt], *, max_tokens: int,
                params: SamplingParams, lookup: int | str = knobs.AUTO, depth: int | str = knobs.AUTO, seed: int = 0,
                model_name: str = "",
                progress: Callable[[str], None] | None = None) -> RewriteReport:
    """Decode every prompt the four ways (see the module's docstring). A prompt's ``messages``
    may also be token ids (no tokenizer needed then: ``tokenizer`` None)."""
    from mtplx.api import encode_prompt, make_prompt_cache
    from mtplx.core.device import device_name
    from mtplx.engine.speculative import Engine
    from mtplx.generation.speculation import depth_policy

    plan = ways(knobs.check("lookup", lookup), model.has_mtp, depth)
    results = {w.name: WayResult(w) for w in plan}
    eos = frozenset(getattr(tokenizer, "eos_token_ids", None) or [])
    encoded = [encode_prompt(tokenizer, p.messages, enable_thinking=False) for p in prompts]
    order = list(plan)
    for i, (p, ids) in enumerate(zip(prompts, encoded)):
        if progress:
            progress(f"prompt {i + 1}/{len(prompts)} ({p.name}, {len(ids)} tokens): prefill ...")
        # One prefill per prompt: each way starts from its own copy of the cache cut just before
        # the prompt's last token (the end-of-prompt snapshot), as the server's prompt cache does.
        base = make_prompt_cache(model)
        for _ in Engine(model, 1 if model.has_mtp else 0, params, None, seed).generate(ids, 1, prompt_cache=base):
            pass
        # Warm-up, from the shared prefill: first-call costs, and auto's step costs measured or
        # read, before any timed run.
        for w in plan if i == 0 else ():
            for _ in Engine(model, depth_policy(model, w.depth, params), params, None, seed,
                            lookup=w.lookup).generate(ids, 4, prompt_cache=base.copy_prefix(len(ids) - 1)):
                pass
        for w in order:
            engine = Engine(model, depth_policy(model, w.depth, params), params, None, seed + i, lookup=w.lookup)
            out = [t for step in engine.generate(ids, max_tokens, eos, prompt_cache=base.copy_prefix(len(ids) - 1))
                   for t in step.tokens]
            r = results[w.name]
            r.runs.append(engine.stats)
            r.outputs.append(out)
            r.texts.append(tokenizer.decode(out) if tokenizer is not None else None)
            a, b = copied(ids, out)
            r.from_prompt += a
            r.from_self += b
            if progress:
                progress(f"  {w.name}: {engine.stats.tokens_per_second:.2f} tok/s, {len(out)} tokens "
                         f"({engine.stats.from_lookup} copied)")
        order = order[1:] + order[:1]
    return RewriteReport(model=model_name, device=device_name(), params=params, max_tokens=max_tokens,
                         prompts=prompts, results=results)


# -- `mtplx bench --shape ... --lookup-acceptance A --lookup-length K` ---------------------------

def lookup_projection(model: Any, acceptance: float, length: int, cap: int, bandwidth_gbs: float,
                      costs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The speedup over AR of copy steps at a real shape: every step copies ``length`` tokens,
    each kept with probability ``acceptance`` given the ones before it were (the running
    acceptance lookup.Lookup keeps per position), so E[tokens/step] = 1 + A + ... + A^K.

    A copy costs no draft pass: memory-bound, a step moves a trunk pass over K + 1 tokens and the
    rollback capture (``model``: a :class:`mtplx.model.shapes.ShapeBytes`); on this machine
    (``costs``: a measured shape's cost model, in AR steps) it costs the verify and the sample of
    K + 1 tokens and the rollback, extrapolated linearly past the verify sizes measured. Every
    step finding a copy of K tokens is the workload's best case: a real rewrite's steps without
    a match run as the head's or AR's."""
    from mtplx.model.shapes import pending_chain, tokens_per_step

    cumulative = [acceptance ** k for k in range(1, length + 1)]  # P(the first k copies all kept)
    e = tokens_per_step(cumulative, length)
    t = length + 1
    ar = sum(model.trunk_pass(1).values())
    step = sum(model.trunk_pass(t).values()) + model.captured(t, "new", pending_chain(cumulative, length, cap))
    out: dict[str, Any] = {"acceptance": acceptance, "length": length, "tokens_per_step": round(e, 4),
                           "memory_bound": round(e * ar / step, 4), "bandwidth_gbs": bandwidth_gbs,
                           "this_machine": None, "this_machine_extrapolated": False}
    if costs is not None:
        def at(steps: dict[str, float]) -> float:
            sizes = sorted(int(k) for k in steps)
            if t in sizes:
                return steps[str(t)]
            lo, hi = sizes[-2:] if len(sizes) > 1 else (sizes[0], sizes[0])
            slope = (steps[str(hi)] - steps[str(lo)]) / (hi - lo) if hi > lo else 0.0
            return steps[str(hi)] + (t - hi) * max(slope, 0.0)

        cost = at(costs["verify_steps"]) + at(costs["sample_steps"]) + costs["rollback_steps"]
        out["this_machine"] = round(e / cost, 4)
        out["this_machine_extrapolated"] = t > max(int(k) for k in costs["verify_steps"])
    return out


def lookup_line(p: dict[str, Any]) -> str:
    here = ("" if p["this_machine"] is None else
            f"{p['this_machine']:.2f}x on this machine{' (verify extrapolated past the sizes measured)' if p['this_machine_extrapolated'] else ''}, ")
    return (f"lookup, every step copying {p['length']} tokens at acceptance {p['acceptance']:g} per token: "
            f"{p['tokens_per_step']:.2f} tokens/step, {here}{p['memory_bound']:.2f}x AR memory-bound at "
            f"{p['bandwidth_gbs']:g} GB/s (no draft pass; the best case: every step finds a copy)")


def shape_bytes(shape_ref: str, trunk_bits: int, prompt_tokens: int, draft_vocab: int | None) -> Any:
    """The bytes model of a catalog shape, built lazily (as `bench --shape --no-measure` builds it)."""
    from mtplx.bench.shape_models import lazy_modules, load_shape, stored_weight_bytes
    from mtplx.model.shapes import ShapeBytes, kind_counts

    shape = load_shape(shape_ref)
    tc = shape.text_config
    vocab = int(tc["vocab_size"])
    draft_vocab = min(32768, vocab) if draft_vocab is None else (vocab if draft_vocab == 0 else min(draft_vocab, vocab))
    weights = stored_weight_bytes(lazy_modules(shape), trunk_bits)
    return ShapeBytes(tc, weights, kind_counts(tc), draft_vocab, prompt_tokens)


def shape_lookup(acceptance: float, length: int, bandwidth_gbs: float, *, report: Any = None,
                 shape_ref: str | None = None, trunk_bits: int = 4, prompt_tokens: int = 512,
                 draft_vocab: int | None = None) -> dict[str, Any]:
    """:func:`lookup_projection` for a measured shape (``report``: a ShapeReport, with this
    machine's costs) or, with ``shape_ref``, from the stored bytes alone (memory-bound only)."""
    from mtplx.model.gated_delta_cache import FUSED_PENDING_CAP

    if report is not None:
        return lookup_projection(report.bytes_model(), acceptance, length, report.pending_cap, bandwidth_gbs,
                                 report.cost_model())
    return lookup_projection(shape_bytes(shape_ref, trunk_bits, prompt_tokens, draft_vocab), acceptance, length,
                             FUSED_PENDING_CAP, bandwidth_gbs)
