"""`mtplx doctor --exactness`: measure on this machine what the test suite proves on MLX's CPU backend.

mtplx promises two things, and they are of different kinds:

- The output **law** of MTP decoding is the law of plain AR decoding. That is a theorem about
  the acceptance rule (engine/sampling.py), true on every backend; floating point only moves the
  law as far as it moves the logits. The *law check* here samples the first token a
  speculative step decides (depth 1, temperature 1, no filters, on one prompt) from the
  model's real p and q on this machine's device, and compares its frequencies with AR's by a
  two-sample chi-square test (computed with numpy and math: scipy is only a test extra).
- **Greedy** MTP output equals greedy AR output token for token only where the backend rounds
  a T-row verify pass exactly as T single-row decode steps. That holds on MLX's CPU backend
  (the tests measure it); a GPU kernel that picks another reduction order for two or more rows
  can flip a near-tie. The *greedy check* decodes the bundled prompts greedily (4 x 64 = 256
  positions by default) with AR, decoded once per prompt as the reference, and with MTP at
  depths 1-3; then the first 4 tokens of each prompt again with a prompt cache, AR and each
  depth (a cache hit's first token comes from a one-token pass instead of the last row of a
  prefill; every later step is the same step code, see PROMPT_CACHE_TOKENS), and reports
  where the outputs part. On the demo on this 2-core CPU the whole check takes about two
  minutes (docs/exactness.md).
  Underneath, the *arithmetic check* compares the logits of a T-row verify pass with T
  single-row decode steps over the same tokens (max abs difference per T, argmax agreement).

A divergence is judged by the top-2 logit margin at its position (a full prefill pass over the
AR context): a flip by rounding needs a margin no larger than the two paths' rounding errors
together, so a margin up to ``max(TIE_FLOOR, 2 x the largest verify-vs-decode difference
measured)`` is a near-tie; a larger one, or a token outside the top two, is a bug to report.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import mlx.core as mx
import numpy as np

from mtplx.core.device import backend, gpu_name
from mtplx.engine import steps
from mtplx.engine.prompt_cache import PromptCache, make_prompt_cache
from mtplx.engine.sampling import Rng, SamplingParams, acceptance_arrays, decide, filtered_probs, sample
from mtplx.engine.speculative import Engine
from mtplx.errors import MtplxError
from mtplx.model.mtp_model import ModelCache, MTPModel

# Bundled prompts: code, prose, a chat-style question and JSON-ish text. Short, since every
# configuration prefills its prompt anew, and ones the demo's head drafts at 1.7-1.9 tokens per
# depth-1 step: on a CPU a verify pass costs a decode step per token, so a prompt that drafts
# badly costs up to half as much again at depth 3 and tests nothing more.
PROMPTS = (
    "def add(a, b):\n",
    "The river",
    "Q: What is a list?\nA:",
    '{"items": [',
)
# Greedy tokens per prompt: 4 x 64 = 256 positions, each decoded by AR and by MTP at depths 1-3.
DEFAULT_TOKENS = 64
# Tokens per prompt decoded again with a prompt cache (AR and each depth). A prompt cache changes
# only how the caches reach the end of the prompt: they are prefilled up to its last token and
# the first logits come from a one-row pass over that token instead of the last row of one
# prefill. Every later step is the same step code on caches holding the same tokens, so where
# a cache makes a difference it shows from the first tokens: the first 4 cover the first token
# and the verify passes that decide the next three (up to three passes: a head drafts worst
# right after a prompt), at a sixteenth of the cost of decoding all 64 again (on a CPU a 4-bit
# verify of T tokens costs about T decode steps, and the check must stay near two minutes).
PROMPT_CACHE_TOKENS = 4
DEPTHS = (1, 2, 3)
# bf16 logits of a 4-bit trunk: a top-2 gap below this is within rounding on any backend.
from mtplx.core.knobs import NEAR_TIE as TIE_FLOOR  # noqa: E402 - one number with strict greedy's margin
LAW_SAMPLES = 4000  # per side (AR and MTP)
LAW_ALPHA = 1e-3
LAW_SEED = 0
_CHUNK = 64  # rows of a [rows, V] array at a time: 64 x 248,320 float32 is 64 MB


def backend_name() -> str:
    """``cpu``, ``cuda``, or ``metal (GPU name)``: the doctor's ``backend`` field."""
    b = backend()
    return f"metal ({gpu_name()})" if b == "metal" else b


@dataclass
class Divergence:
    """Where one configuration's greedy output first leaves greedy AR's."""

    prompt: int
    depth: int
    prompt_cache: bool
    position: int  # index in the generated tokens
    ar_token: int
    other_token: int
    margin: float  # top-2 logit gap at that position
    in_top2: bool  # both tokens among the two likeliest

    def near_tie(self, threshold: float) -> bool:
        return self.in_top2 and self.margin <= threshold

    def as_dict(self, threshold: float) -> dict[str, Any]:
        return {**vars(self), "margin": round(self.margin, 6), "near_tie": self.near_tie(threshold)}


@dataclass
class LawCheck:
    p_value: float
    samples: int  # per side
    cells: int
    acceptance: float  # sum(min(p, q)): how often the draft is kept
    power: float  # against the commonest bias: the residual drawn from p instead of max(0, p - q)

    @property
    def passed(self) -> bool:
        return self.p_value >= LAW_ALPHA


@dataclass
class ExactnessReport:
    backend: str
    tokens: int
    prompts: int
    configurations: list[str]
    divergences: list[Divergence]
    verify_vs_decode: dict[int, float]
    argmax_agrees: dict[int, bool]
    law: LawCheck
    prompt_cache_tokens: int = 0  # per prompt, for the configurations with a prompt cache
    seconds: float = 0.0
    model: str = ""

    @property
    def threshold(self) -> float:
        return max(TIE_FLOOR, 2 * max(self.verify_vs_decode.values(), default=0.0))

    @property
    def positions(self) -> int:
        """Greedy positions compared for AR vs MTP at each depth without a prompt cache."""
        return self.tokens * self.prompts

    @property
    def prompt_cache_positions(self) -> int:
        """Of those, the ones compared again with a prompt cache (AR and each depth)."""
        return self.prompt_cache_tokens * self.prompts

    @property
    def greedy_identical(self) -> bool:
        return not self.divergences

    @property
    def bugs(self) -> list[Divergence]:
        return [d for d in self.divergences if not d.near_tie(self.threshold)]

    @property
    def ok(self) -> bool:
        """Exit 0: identical, or every divergence a near-tie, and the law check passed."""
        return not self.bugs and self.law.passed

    @property
    def verdict(self) -> str:
        if self.bugs:
            return "divergence-bug"
        if not self.law.passed:
            return "law-check-failed"
        return "identical" if self.greedy_identical else "near-ties-only"

    def as_json(self) -> dict[str, Any]:
        margins = [d.margin for d in self.divergences]
        return {
            "exactness": {
                "backend": self.backend,
                "greedy_identical": self.greedy_identical,
                "positions": self.positions,
                "prompt_cache_positions": self.prompt_cache_positions,
                "diverged_at": [d.position for d in self.divergences],
                "min_margin_at_divergence": round(min(margins), 6) if margins else None,
                "verify_vs_decode": {str(t): v for t, v in sorted(self.verify_vs_decode.items())},
                "law_check": {"p_value": self.law.p_value, "samples": self.law.samples},
            },
            "details": {
                "model": self.model,
                "verdict": self.verdict,
                "ok": self.ok,
                "tokens_per_prompt": self.tokens,
                "prompt_cache_tokens_per_prompt": self.prompt_cache_tokens,
                "prompts": self.prompts,
                "configurations": self.configurations,
                "near_tie_threshold": self.threshold,
                "divergences": [d.as_dict(self.threshold) for d in self.divergences],
                "verify_vs_decode_argmax_agrees": {str(t): v for t, v in sorted(self.argmax_agrees.items())},
                "law_check": {**vars(self.law), "alpha": LAW_ALPHA, "passed": self.law.passed,
                              "what": "first token decided by a depth-1 step, temperature 1, no filters, "
                                      "AR vs MTP, two-sample chi-square"},
                "seconds": round(self.seconds, 1),
            },
        }

    def verdict_record(self) -> dict[str, Any]:
        """What is saved beside the user's config for `mtplx bench` to quote."""
        return {"verdict": self.verdict, "backend": self.backend, "greedy_identical": self.greedy_identical,
                "positions": self.positions, "bugs": len(self.bugs), "law_p_value": self.law.p_value,
                "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}


# -- greedy ------------------------------------------------------------------------------------

GREEDY = SamplingParams(temperature=0.0)


def greedy_tokens(model: MTPModel, ids: list[int], depth: int, n: int,
                  prompt_cache: PromptCache | None = None) -> list[int]:
    """``n`` greedy tokens (no EOS stop, so every run covers the same positions), through the
    engine as `mtplx.generate` runs it, with ``prompt_cache`` if given (it is advanced)."""
    engine = Engine(model, depth, GREEDY, seed=0)
    return [t for step in engine.generate(ids, n, prompt_cache=prompt_cache) for t in step.tokens]


def margin_at(model: MTPModel, context: list[int], tokens: tuple[int, int]) -> tuple[float, bool]:
    """Top-2 logit gap after ``context`` (one prefill pass), and whether ``tokens`` are the top two."""
    logits = model.trunk.logits(mx.array([context]), model.trunk.make_cache())[0, -1].astype(mx.float32)
    order = mx.argsort(logits)[-2:]
    top = mx.sort(logits)[-2:]
    gap = float((top[1] - top[0]).item())
    return gap, set(tokens) <= set(order.tolist())


def first_divergence(ar: list[int], other: list[int]) -> int | None:
    return next((i for i, (a, b) in enumerate(zip(ar, other)) if a != b), None)


# -- arithmetic: T-row verify vs T single-row decode steps --------------------------------------

def verify_vs_decode(model: MTPModel, prefix: ModelCache, continuation: list[int],
                     max_t: int) -> dict[int, tuple[float, bool]]:
    """Per T in 1..max_t: (max |verify logits - decode logits|, argmax agrees on every row), over
    the first T tokens of ``continuation`` fed after ``prefix`` (a cache holding what precedes
    them). Each pass runs on a fork of ``prefix``, one after the other, and ``prefix`` itself is
    never advanced, as ModelCache.fork asks."""
    cache = prefix.fork()
    rows = []
    for t in continuation[:max_t]:
        rows.append(steps.ar_step(model, cache, mx.array([t])).astype(mx.float32))
        mx.eval(rows[-1])
    decode = mx.concatenate(rows, axis=0)  # [max_t, V]
    out = {}
    for t in range(1, min(max_t, len(continuation)) + 1):
        logits, _, _ = steps.verify(model, prefix.fork(), mx.array([continuation[:t]]))
        block = logits[0].astype(mx.float32)
        diff = float(mx.abs(block - decode[:t]).max().item())
        agree = bool(mx.all(mx.argmax(block, axis=-1) == mx.argmax(decode[:t], axis=-1)).item())
        out[t] = (diff, agree)
    return out


# -- the law ---------------------------------------------------------------------------------

def chi2_sf(x: float, df: int) -> float:
    """P(chi-square with ``df`` degrees of freedom > x): the regularized upper incomplete gamma
    Q(df/2, x/2), by its series below a + 1 and Lentz's continued fraction above."""
    if x <= 0:
        return 1.0
    a, x = df / 2.0, x / 2.0
    log_front = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1:
        term = total = 1.0 / a
        n = a
        for _ in range(100000):
            n += 1
            term *= x / n
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return min(1.0, max(0.0, 1.0 - total * math.exp(log_front)))
    tiny = 1e-300
    b = x + 1 - a
    c, d = 1 / tiny, 1 / b
    h = d
    for i in range(1, 100000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-15:
            break
    return min(1.0, max(0.0, h * math.exp(log_front)))


def chi2_critical(df: int, alpha: float) -> float:
    """The x with chi2_sf(x, df) = alpha (bisection)."""
    lo, hi = 0.0, df + 20.0 * math.sqrt(2 * df) + 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if chi2_sf(mid, df) > alpha else (lo, mid)
    return hi


def pooled_cells(weights: np.ndarray, n: int) -> np.ndarray:
    """Cell index per token: tokens expected at least 5 times in ``n`` draws keep their own cell,
    the rest share the last one (the usual rule for a chi-square approximation)."""
    big = weights * n >= 5
    cells = np.full(weights.shape, int(big.sum()), dtype=np.int64)
    cells[big] = np.arange(int(big.sum()))
    return cells


def homogeneity_test(a: np.ndarray, b: np.ndarray, cells: np.ndarray) -> tuple[float, int]:
    """Two-sample chi-square over pooled cells: (p-value, number of cells used)."""
    k = int(cells.max()) + 1
    ca = np.bincount(cells[a], minlength=k).astype(float)
    cb = np.bincount(cells[b], minlength=k).astype(float)
    keep = (ca + cb) > 0
    ca, cb = ca[keep], cb[keep]
    total = ca + cb
    ea, eb = total * ca.sum() / total.sum(), total * cb.sum() / total.sum()
    stat = float(((ca - ea) ** 2 / ea).sum() + ((cb - eb) ** 2 / eb).sum())
    df = max(int(keep.sum()) - 1, 1)
    return chi2_sf(stat, df), int(keep.sum())


def power_against(p: np.ndarray, biased: np.ndarray, n: int, alpha: float, seed: int = 0) -> float:
    """Power of the two-sample test with ``n`` draws per side to tell ``p`` from ``biased``:
    noncentral chi-square with lambda = n/2 * sum((p - b)^2 / ((p + b) / 2)) over the pooled
    cells, by 20,000 numpy draws."""
    mid = (p + biased) / 2
    cells = pooled_cells(mid, n)
    k = int(cells.max()) + 1
    cp, cb = np.bincount(cells, p, minlength=k), np.bincount(cells, biased, minlength=k)
    m = (cp + cb) / 2
    keep = m > 0
    lam = float(n / 2 * ((cp[keep] - cb[keep]) ** 2 / m[keep]).sum())
    df = max(int(keep.sum()) - 1, 1)
    crit = chi2_critical(df, alpha)
    draws = np.random.default_rng(seed).noncentral_chisquare(df, max(lam, 1e-12), 20000)
    return float((draws > crit).mean())


def _sample_rows(probs: mx.array, n: int, rng: Rng) -> np.ndarray:
    """``n`` independent draws from one law ``probs [1, V]``, through the engine's own sampler."""
    out = []
    for start in range(0, n, _CHUNK):
        rows = min(_CHUNK, n - start)
        tokens = sample(mx.broadcast_to(probs, (rows, probs.shape[-1])), rng.sampling(rows))
        out.append(np.array(tokens))
    return np.concatenate(out)


def law_check(model: MTPModel, ids: list[int], samples: int = LAW_SAMPLES, seed: int = LAW_SEED,
              acceptance: Callable[..., tuple[mx.array, mx.array]] = acceptance_arrays) -> LawCheck:
    """The first token a depth-1 step decides, sampled ``samples`` times by AR (decode pass) and
    by the speculative rule (draft from the head, p from a 2-row verify pass), after the prompt
    and its greedy first token. Both sides use the engine's own sampling functions;
    ``acceptance`` is swappable, as the engine's is, so a test can show a biased rule is caught."""
    params = SamplingParams(temperature=1.0, top_p=1.0, top_k=0)
    vocab, subset = model.vocab_size, model.draft_vocab
    rng = Rng(seed)
    cache = model.make_cache()
    logits, _ = steps.prefill(model, ids, cache, head=True)
    x1 = int(mx.argmax(logits, axis=-1).item())
    d_logits, _ = steps.draft(model, cache, cache.backlog, mx.array([[x1]]))
    q_sub = filtered_probs(d_logits[0], params)  # [1, K]
    q = subset.scatter(q_sub, vocab) if subset is not None else q_sub
    mx.eval(q)

    # AR: the law after x1 from a single-row decode step (a fresh cache: prefill + one step).
    ar_cache = model.make_cache()
    steps.prefill(model, ids, ar_cache, head=False)
    p_ar = filtered_probs(steps.ar_step(model, ar_cache, mx.array([x1])), params)
    mx.eval(p_ar)
    ar = _sample_rows(p_ar, samples, rng)

    # MTP: drafts d ~ q, then p from the verify pass over [x1, d] (row 0 does not depend on d).
    cols = _sample_rows(q_sub, samples, rng)
    drafts = np.array(subset.token_ids(mx.array(cols))) if subset is not None else cols
    logits, _, _ = steps.verify(model, cache, mx.array([[x1, int(drafts[0])]]))
    p = filtered_probs(logits[0, :1], params)
    mx.eval(p)
    mtp = np.empty(samples, dtype=np.int64)
    for start in range(0, samples, _CHUNK):
        rows = min(_CHUNK, samples - start)
        d = mx.array(drafts[start : start + rows].astype(np.int32))
        # `rows` independent one-draft steps stacked as rows; the last row is a bonus row, unused.
        ratio, candidates = acceptance(mx.broadcast_to(p, (rows + 1, vocab)),
                                              mx.broadcast_to(q, (rows, vocab)), d, rng)
        mx.eval(ratio, candidates)
        ratio_h, cand_h = np.array(ratio), np.array(candidates)
        for i in range(rows):
            verdict = decide(ratio_h[i : i + 1], cand_h[[i, rows]], rng)
            mtp[start + i] = drafts[start + i] if verdict.accepted else verdict.next_token

    p_h = np.array(p[0], dtype=np.float64)
    q_h = np.array(q[0], dtype=np.float64)
    cells = pooled_cells((p_h + np.array(p_ar[0], dtype=np.float64)) / 2, 2 * samples)
    p_value, used = homogeneity_test(ar, mtp, cells)
    kept = np.minimum(p_h, q_h)
    biased = kept + (1 - kept.sum()) * p_h  # the residual drawn from p: accepted drafts + p
    return LawCheck(p_value=p_value, samples=samples, cells=used, acceptance=float(kept.sum()),
                    power=power_against(p_h, biased, samples, LAW_ALPHA))


# -- the whole check -------------------------------------------------------------------------

def _label(depth: int, cached: bool) -> str:
    return f"{'AR' if depth == 0 else f'MTP d{depth}'}{' + prompt cache' if cached else ''}"


def check_exactness(model: MTPModel, tokenizer: Any, *, tokens: int = DEFAULT_TOKENS,
                    prompt_cache_tokens: int = PROMPT_CACHE_TOKENS, prompts: Sequence[str] = PROMPTS,
                    depths: Sequence[int] = DEPTHS, law_samples: int = LAW_SAMPLES,
                    progress: Callable[[str], None] | None = None, model_name: str = "") -> ExactnessReport:
    """Per prompt: greedy AR (the reference, decoded once), MTP at each depth over the same
    ``tokens`` positions, then AR and each depth again with a prompt cache over the first
    ``prompt_cache_tokens`` of them, and the arithmetic check; then the law check."""
    if not model.has_mtp:
        raise MtplxError("the exactness check compares MTP with AR, and this model has no MTP head",
                         fix="load an mtplx artifact (not --no-mtp), e.g. `mtplx doctor --exactness --model demo`")
    t0 = time.perf_counter()
    say = (lambda msg: progress(f"[{time.perf_counter() - t0:5.1f} s] {msg}")) if progress else (lambda _msg: None)
    encoded = [list(tokenizer.encode(p)) for p in prompts]
    cached_n = min(prompt_cache_tokens, tokens)
    configs = [(d, False) for d in depths] + ([(d, True) for d in (0, *depths)] if cached_n else [])
    divergences: list[Divergence] = []
    arithmetic: dict[int, tuple[float, bool]] = {}
    for i, ids in enumerate(encoded):
        where = f"prompt {i + 1}/{len(encoded)}"
        ar = greedy_tokens(model, ids, 0, tokens)
        say(f"{where}: AR reference, {len(ar)} tokens")
        # The first configuration with a prompt cache fills a fresh one. Its prefill stops before
        # the prompt's last token (the end-of-prompt snapshot) and its first logits come from a
        # one-row pass over that token, exactly as on a hit; the later ones run on copies of it
        # cut back to that snapshot (real hits), and so does the arithmetic check below.
        base = make_prompt_cache(model)
        for depth, cached in configs:
            n = cached_n if cached else tokens
            cache = (base.copy_prefix(base.reusable(ids)) if base.tokens else base) if cached else None
            other = greedy_tokens(model, ids, depth, n, cache)
            at = first_divergence(ar, other)
            say(f"{where}: {_label(depth, cached)}, {n} tokens: " + ("identical" if at is None else f"differs at {at}"))
            if at is not None:
                gap, top2 = margin_at(model, ids + ar[:at], (ar[at], other[at]))
                divergences.append(Divergence(i, depth, cached, at, ar[at], other[at], gap, top2))
        if not base.tokens:  # no configuration with a prompt cache: fill it with one AR token
            greedy_tokens(model, ids, 0, 1, base)
        served = base.reusable(ids)
        # T-row verify vs T decode steps over the prompt's last token and the first AR tokens,
        # after the rest of the prompt (a copy of the prompt cache: no prefill of its own)
        prefix = base.copy_prefix(served).cache
        for t, (diff, agree) in verify_vs_decode(model, prefix, ids[served:] + ar, max(depths) + 1).items():
            old = arithmetic.get(t, (0.0, True))
            arithmetic[t] = (max(old[0], diff), old[1] and agree)
    say(f"law check: {law_samples} samples per side")
    law = law_check(model, encoded[0], law_samples)
    return ExactnessReport(
        backend=backend_name(), tokens=tokens, prompts=len(encoded),
        configurations=[_label(d, c) for d, c in configs],
        divergences=divergences, verify_vs_decode={t: v[0] for t, v in arithmetic.items()},
        argmax_agrees={t: v[1] for t, v in arithmetic.items()}, law=law, prompt_cache_tokens=cached_n,
        seconds=time.perf_counter() - t0, model=model_name)


def format_report(r: ExactnessReport, command: str) -> str:
    lines = [f"backend            {r.backend}",
             f"greedy             {r.positions} positions ({r.prompts} prompts x {r.tokens} tokens), AR vs "
             f"{', '.join(c for c in r.configurations if 'cache' not in c)}"]
    cached = [c for c in r.configurations if "cache" in c]
    if cached:
        lines.append(f"  prompt cache     the first {r.prompt_cache_positions} of them ({r.prompts} x "
                     f"{r.prompt_cache_tokens}), AR vs {', '.join(cached)}")
    if r.greedy_identical:
        lines.append("greedy identical   yes: every configuration equals greedy AR token for token")
    else:
        lines.append(f"greedy identical   no ({len(r.divergences)} configuration(s) diverge; near-tie threshold "
                     f"{r.threshold:.3g})")
        for d in r.divergences:
            kind = "near-tie (rounding)" if d.near_tie(r.threshold) else "NOT a near-tie"
            lines.append(f"  prompt {d.prompt + 1}, {_label(d.depth, d.prompt_cache)}: token {d.position}, "
                         f"{d.ar_token} vs {d.other_token}, top-2 margin {d.margin:.4g}: {kind}")
    for t in sorted(r.verify_vs_decode):
        lines.append(f"verify vs decode   T={t}: max |diff| {r.verify_vs_decode[t]:.3g}, argmax "
                     f"{'agrees' if r.argmax_agrees[t] else 'DIFFERS'}")
    lines.append(f"law check          p = {r.law.p_value:.3g} over {r.law.samples} samples per side "
                 f"({r.law.cells} cells; power {r.law.power:.2f} against a residual drawn from p, draft acceptance "
                 f"{r.law.acceptance:.2f}): {'passed' if r.law.passed else 'REJECTED'} at {LAW_ALPHA:g}")
    lines.append(f"time               {r.seconds:.1f} s")
    if r.bugs:
        lines.append(f"verdict            BUG: a divergence above rounding. Please file an issue with this report "
                     f"and the output of `{command} --json -`")
    elif not r.law.passed:
        lines.append(f"verdict            the law check rejected AR = MTP at {LAW_ALPHA:g}: please file an issue with "
                     f"the output of `{command} --json -`")
    elif r.greedy_identical:
        lines.append("verdict            exact: greedy MTP equals greedy AR here, and the sampled law matches")
    else:
        lines.append("verdict            exact up to rounding: greedy output differs only at near-ties (this backend "
                     "rounds a multi-row verify unlike a single-row step); the sampled law matches")
        lines.append(f"                   to have greedy MTP decide near-ties as AR does, pass --strict-greedy to run "
                     f"or serve (--strict-margin {r.threshold:.3g}: this check's near-tie threshold)")
    return "\n".join(lines)
