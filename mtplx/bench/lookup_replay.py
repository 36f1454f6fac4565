"""`mtplx bench --workload rewrite --replay`: what copies from the context (lookup.py) would
propose and get accepted on a faithful rewrite, whatever the model's quality.

Choosing lookup's n-gram sizes (``NGRAMS``) and its copy ceiling (``MAX_COPY``) by decoding with a
model measures that model's output: the bundled 10M models loop instead of rewriting, so a
decode would tune lookup to their loops. The replay takes the model out: each shipped rewrite
prompt (mtplx/data/rewrite_prompts.json) carries a ``"reference"``, the reply a faithful model
gives (the file back with the one change), and the replay walks it as a greedy model emitting
exactly those tokens (then the end token) would be decoded:

- the reference's first token comes from the prefill (as in the engine), and the row's index
  starts over the rendered prompt and that token (batch.py ``_first``);
- each step asks the row's real :class:`~mtplx.engine.lookup.Lookup` for a copy (mode K: up to K
  tokens whenever the index has a match; "auto": the k <= K the cost model picks from the running
  acceptance, against a plain step). The accepted count is the copy's longest prefix equal to
  the reference's next tokens; the step emits those and one more (the verify's bonus or
  correction), cut at the reference's end. No copy: a plain AR step emits one token. The index
  is extended by what was emitted, and auto observes the copy, as batch.py ``_accept`` does;
- a copy step verifying k tokens costs ``Lookup.copy_cost(costs, k)``, a plain step
  ``costs.ar``, each priced at the step's context (``StepCosts.at``). The speedup is the AR time of
  the same tokens over the replay's time.

What it does not measure: a real model's acceptance. It assumes the model emits the reference
(greedy, and faithful); at temperature a copied token is kept with probability p(x) < 1, so real
acceptance is lower, and a model that strays from the reference copies less. The head (MTP) is
left out: "auto" weighs a copy against the plain lane only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from mtplx.bench.rewrite import PROMPTS_FILE, RewritePromptError, load_prompts
from mtplx.engine.lookup import AUTO, Lookup
from mtplx.engine.policy import AutoDepth, StepCosts
from mtplx.errors import MtplxError

__all__ = ["GRID_K", "GRID_NGRAMS", "MEMORY_BOUND", "Case", "ReplayResult", "cases", "memory_bound_costs", "replay",
           "run_grid", "GridReport"]

# The grid: single sizes from 1 (any repeated token) to 8, and pairs (longest tried first) that
# prefer a long match (where the file really is) but fall back to a short one (to pick the copy
# up again right after the edit).
GRID_NGRAMS: tuple[tuple[int, ...], ...] = ((1,), (2,), (3,), (4,), (6,), (8,), (4, 2), (6, 2), (8, 2), (12, 2),
                                            (6, 3), (8, 3), (12, 3), (8, 4), (12, 4), (16, 4))
GRID_K: tuple[int, ...] = (4, 8, 12, 16, 24, 32)
MEMORY_BOUND = "memory-bound"
THIS_MACHINE = "this machine"
# A memory-bound device (a GPU, Apple silicon) reads the weights once per verify pass, whatever
# its width: a verify over t tokens is taken to cost 1 + 0.02 (t - 1) AR steps.
MEMORY_BOUND_SLOPE = 0.02
MEMORY_BOUND_NOTE = (f"memory-bound: a verify over t tokens assumed to cost 1 + {MEMORY_BOUND_SLOPE:g} (t - 1) AR steps, "
                     "no overhead (a GPU or Apple silicon reading the weights once per pass)")


def memory_bound_costs(max_copy: int = max(GRID_K)) -> StepCosts:
    """The memory-bound profile (:data:`MEMORY_BOUND_NOTE`), in AR steps, for copies up to ``max_copy``."""
    return StepCosts(tuple(1.0 + MEMORY_BOUND_SLOPE * t for t in range(max_copy + 1)), 0.0, 0.0, 1.0)


@dataclass
class Case:
    """One rewrite: the rendered prompt's token ids and the reference reply's (end token included)."""

    name: str
    prompt: list[int]
    reference: list[int]


def _end_token(tokenizer: Any) -> int | None:
    """The token a reply ends with: the chat template's turn end (``<|im_end|>`` for Qwen), else EOS."""
    for name in ("<|im_end|>",):
        ids = tokenizer.convert_tokens_to_ids(name) if hasattr(tokenizer, "convert_tokens_to_ids") else None
        unk = getattr(tokenizer, "unk_token_id", None)
        if isinstance(ids, int) and ids != unk:
            return ids
    eos = getattr(tokenizer, "eos_token_id", None)
    return eos if isinstance(eos, int) else None


def cases(tokenizer: Any, path: str | Path | None = None) -> list[Case]:
    """The rewrite prompts of ``path`` (default: the shipped ones) with their ``"reference"``
    replies, tokenized by ``tokenizer`` (mlx-lm's wrapper or a transformers tokenizer)."""
    from mtplx.generation.chat_template import chat_ids

    prompts = load_prompts(path)
    path = PROMPTS_FILE if path is None else Path(path).expanduser()
    end = _end_token(tokenizer)
    out = []
    for i, p in enumerate(prompts):
        ref = p.reference
        if ref is None:
            raise RewritePromptError(f"{path}: prompts[{i}] ({p.name}) has no \"reference\" reply to replay",
                                     fix="add \"reference\": the exact reply a faithful model gives (the file with "
                                         "the one change), as mtplx/data/rewrite_prompts.json does")
        ids = list(tokenizer.encode(ref, add_special_tokens=False)) + ([] if end is None else [end])
        # As the rewrite workload renders it (generation prompt, thinking off).
        out.append(Case(p.name, chat_ids(tokenizer, p.messages, False, True), ids))
    return out


class _PlainLane:
    """What :meth:`Lookup.choose` reads of a row's depth policy: the costs it prices a copy
    with, and the rate of the alternative, the plain lane (no head: max_depth 0)."""

    max_depth = 0

    def __init__(self, costs: StepCosts):
        self.costs = costs

    def rate(self, depth: int) -> float:
        return 1.0 / self.costs.ar


@dataclass
class ReplayResult:
    """One case replayed at one (ngrams, K, mode) under one cost profile."""

    tokens: int  # decoded tokens (the reference's, end token included, less the prefill's first)
    steps: int
    copy_steps: int
    proposed: int  # copied tokens verified
    accepted: int  # of those, kept
    time: float  # the replay's cost, in the profile's units
    ar_time: float  # the same tokens one AR step each

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / self.steps if self.steps else 0.0

    @property
    def precision(self) -> float | None:
        return self.accepted / self.proposed if self.proposed else None

    @property
    def speedup(self) -> float:
        return self.ar_time / self.time if self.time else 1.0

    def __add__(self, other: "ReplayResult") -> "ReplayResult":
        return ReplayResult(*(getattr(self, f) + getattr(other, f) for f in self.__dataclass_fields__))

    def as_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "steps": self.steps, "copy_steps": self.copy_steps, "proposed": self.proposed,
                "accepted": self.accepted, "tokens_per_step": round(self.tokens_per_step, 4),
                "precision": None if self.precision is None else round(self.precision, 4),
                "time": round(self.time, 4), "ar_time": round(self.ar_time, 4), "speedup": round(self.speedup, 4)}


def _matched(copy: Sequence[int], ahead: Sequence[int]) -> int:
    n = 0
    for a, b in zip(copy, ahead):
        if a != b:
            break
        n += 1
    return n


def replay(prompt: Sequence[int], reference: Sequence[int], ngrams: Sequence[int], k: int, costs: StepCosts,
           mode: str = "fixed") -> ReplayResult:
    """Walk ``reference`` after ``prompt`` (see the module) with lookup over ``ngrams`` copying up
    to ``k`` tokens: every match in full (``mode`` "fixed", the engine's lookup=K) or as
    :meth:`Lookup.choose` decides under ``costs`` (``mode`` "auto")."""
    if mode not in ("fixed", AUTO):
        raise ValueError(f"mode must be 'fixed' or 'auto', got {mode!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    ref = list(reference)
    if not ref:
        return ReplayResult(0, 0, 0, 0, 0, 0.0, 0.0)
    lookup = Lookup(AUTO if mode == AUTO else k, ngrams)
    if mode == AUTO:  # auto's ceiling is lookup.MAX_COPY; the replay sweeps it
        lookup.max_copy, lookup.acceptance = k, [Lookup.PRIOR] * k
    lookup.start(list(prompt) + ref[:1])
    priced: dict[int, StepCosts] = {}
    pos, steps, copy_steps, proposed, accepted, time, ar_time = 1, 0, 0, 0, 0, 0.0, 0.0
    while pos < len(ref):
        context = len(prompt) + pos
        # Priced per bucket of context, as AutoDepth re-prices the costs Lookup.choose reads.
        bucket = context // AutoDepth.CONTEXT_BUCKET
        here = priced.get(bucket)
        if here is None:
            here = priced[bucket] = costs.at(bucket * AutoDepth.CONTEXT_BUCKET)
        head = _PlainLane(here)
        copy = lookup.choose(k, head, 0)  # room: the budget never cuts a copy (the reply ends at its end token)
        if copy:
            a = _matched(copy, ref[pos:])
            emitted = ref[pos : pos + a + 1]
            time += Lookup.copy_cost(here, len(copy))
            lookup.observe(len(copy), a)
            copy_steps += 1
            proposed += len(copy)
            accepted += a
        else:
            emitted = ref[pos : pos + 1]
            time += here.ar
        ar_time += here.ar * len(emitted)  # AR priced as the step is: a ratio of like to like
        lookup.extend(emitted)
        pos += len(emitted)
        steps += 1
    return ReplayResult(len(ref) - 1, steps, copy_steps, proposed, accepted, time, ar_time)


@dataclass
class GridReport:
    tokenizer: str
    cases: list[Case]
    profiles: dict[str, StepCosts]
    # (profile, mode, ngrams, k) -> one result per case
    results: dict[tuple[str, str, tuple[int, ...], int], list[ReplayResult]]

    def total(self, key: tuple[str, str, tuple[int, ...], int]) -> ReplayResult:
        out = self.results[key][0]
        for r in self.results[key][1:]:
            out = out + r
        return out

    def ranked(self, profile: str = MEMORY_BOUND, mode: str = AUTO) -> list[tuple[tuple[int, ...], int, float]]:
        """(ngrams, K, summed speedup), best first (ties: fewer n-gram sizes, smaller K)."""
        rows = [(key[2], key[3], self.total(key).speedup) for key in self.results if key[:2] == (profile, mode)]
        return sorted(rows, key=lambda r: (-round(r[2], 6), len(r[0]), r[1]))

    def table(self) -> str:
        """Summed over the prompts, one row per (ngrams, K)."""
        mach = THIS_MACHINE in self.profiles
        head = (f"{'ngrams':<8} {'K':>3} {'tok/step':>8} {'precision':>9} {'fixed MB':>8} {'auto MB':>8}"
                + (f" {'fixed here':>10} {'auto here':>10}" if mach else ""))
        rows = [head, "-" * len(head)]
        for key in self.results:
            profile, mode, ngrams, k = key
            if (profile, mode) != (MEMORY_BOUND, "fixed"):
                continue
            t = self.total(key)
            line = (f"{','.join(map(str, ngrams)):<8} {k:>3} {t.tokens_per_step:>8.2f} {t.precision or 0:>9.3f} "
                    f"{t.speedup:>7.2f}x {self.total((MEMORY_BOUND, AUTO, ngrams, k)).speedup:>7.2f}x")
            if mach:
                line += (f" {self.total((THIS_MACHINE, 'fixed', ngrams, k)).speedup:>9.2f}x"
                         f" {self.total((THIS_MACHINE, AUTO, ngrams, k)).speedup:>9.2f}x")
            rows.append(line)
        return "\n".join(rows)

    def per_prompt(self, ngrams: tuple[int, ...], k: int) -> str:
        rows = [f"{'prompt':<18} {'tokens':>6} {'steps':>5} {'tok/step':>8} {'precision':>9} {'fixed MB':>8} "
                f"{'auto MB':>8}"]
        for c, f, a in zip(self.cases, self.results[(MEMORY_BOUND, "fixed", ngrams, k)],
                           self.results[(MEMORY_BOUND, AUTO, ngrams, k)]):
            rows.append(f"{c.name:<18} {f.tokens:>6} {f.steps:>5} {f.tokens_per_step:>8.2f} {f.precision or 0:>9.3f} "
                        f"{f.speedup:>7.2f}x {a.speedup:>7.2f}x")
        return "\n".join(rows)

    def summary(self, top: int = 5) -> list[str]:
        lines = [MEMORY_BOUND_NOTE + "."]
        for mode, what in ((AUTO, "lookup auto (the cost model picks k <= K)"), ("fixed", "lookup=K (every match copied in full)")):
            ranked = self.ranked(MEMORY_BOUND, mode)
            best = ranked[0]
            near = ", ".join(f"{','.join(map(str, n))}/K={k} {s:.3f}x" for n, k, s in ranked[1:top])
            lines.append(f"best for {what}, memory-bound, summed over the prompts: ngrams "
                         f"{','.join(map(str, best[0]))}, K={best[1]}: {best[2]:.3f}x AR; next: {near}.")
        lines.append("The replay assumes the model emits the reference (greedy, faithful); a real model's copies are "
                     "kept with probability p(x) at temperature, so real acceptance is lower. No MTP head: auto weighs a "
                     "copy against the plain lane only.")
        return lines

    def as_dict(self) -> dict[str, Any]:
        grid = []
        for (profile, mode, ngrams, k), per in self.results.items():
            grid.append({"profile": profile, "mode": mode, "ngrams": list(ngrams), "k": k,
                         "total": self.total((profile, mode, ngrams, k)).as_dict(),
                         "per_prompt": {c.name: r.as_dict() for c, r in zip(self.cases, per)}})
        best = {mode: dict(zip(("ngrams", "k", "speedup"), self.ranked(MEMORY_BOUND, mode)[0])) for mode in ("fixed", AUTO)}
        return {"tokenizer": self.tokenizer,
                "prompts": {c.name: {"prompt_tokens": len(c.prompt), "reference_tokens": len(c.reference)}
                            for c in self.cases},
                "profiles": {name: {**c.as_dict(), **({"assumption": MEMORY_BOUND_NOTE} if name == MEMORY_BOUND else {})}
                             for name, c in self.profiles.items()},
                "best_memory_bound": best,
                "top_memory_bound": {mode: [{"ngrams": list(n), "k": k, "speedup": round(s, 4)}
                                            for n, k, s in self.ranked(MEMORY_BOUND, mode)[:5]]
                                     for mode in ("fixed", AUTO)},
                "grid": grid, "summary": self.summary()}


def run_grid(found: list[Case], *, costs: StepCosts | None = None,
             ngrams_grid: Sequence[Sequence[int]] = GRID_NGRAMS, k_grid: Sequence[int] = GRID_K,
             tokenizer_name: str = "", progress: Callable[[str], None] | None = None) -> GridReport:
    """Replay every case (:func:`cases`) at every (ngrams, K), copying in full ("fixed") and as
    auto would, under the memory-bound profile and, given ``costs`` (this machine's, from
    generation.speculation.step_costs), under those."""
    if not found:
        raise MtplxError("no rewrite references to replay", fix="pass a prompts file with at least one prompt")
    profiles = {MEMORY_BOUND: memory_bound_costs(max(k_grid))}
    if costs is not None:
        profiles[THIS_MACHINE] = costs
    results = {}
    for profile, c in profiles.items():
        if progress:
            progress(f"replaying {len(found)} references x {len(ngrams_grid)} n-gram sets x {len(k_grid)} K ({profile})")
        for mode in ("fixed", AUTO):
            for ngrams in ngrams_grid:
                for k in k_grid:
                    results[(profile, mode, tuple(ngrams), k)] = [replay(x.prompt, x.reference, ngrams, k, c, mode)
                                                                  for x in found]
    return GridReport(tokenizer_name, found, profiles, results)
