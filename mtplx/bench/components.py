"""Time each piece of a speculative step on a model, through the engine's own step functions.

Every component is timed on a cache prefilled with the prompt, on a fork of it that is dropped
afterwards, as the median of ``repeats`` calls after one warm-up call; a call counts until
everything it returns and leaves in the caches is evaluated. Milliseconds throughout.

Besides the engine-path figures, two small kinds of figure let ``shape_report`` compose a
measurement on N layers to the full depth:

- ``fixed``: the part of a trunk pass that does not grow with depth (embedding, final norm,
  lm_head over the rows that need it; for the AR step also its sampling), timed with the
  trunk's own modules;
- ``per_layer``: one decoder layer of each kind (mlx-lm's own module, called as the trunk calls
  it) at each token count, which apportions the layers' share between the two kinds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx
import numpy as np
from mlx_lm.models.base import create_attention_mask

from mtplx.engine.cost_model import median_ms, pipelined_ar_ms
from mtplx.model.shapes import FULL, LINEAR
from mtplx.engine.sampling import Rng, SamplingParams, acceptance_arrays, decide, filtered_probs, sample_logits
from mtplx.engine import steps
from mtplx.model.mtp_model import ModelCache, MTPModel
from mtplx.model.trunk import VerifyRecord

PREFILL = "prefill"


@dataclass
class Timings:
    """Medians in ms. Keys of ``verify``/``sample``/``fixed``/``per_layer[kind]``: the token
    count T as a string (``sample`` from T=2: a verify of one token accepts nothing), plus
    ``prefill`` (and ``ar`` in ``fixed``)."""

    ar_step: float
    verify: dict[str, float]
    sample: dict[str, float]
    draft: float
    draft_full_vocab: float | None
    commit: dict[str, float]  # "rollback" (no draft kept) and "full" (all kept)
    prefill: dict[str, float]  # "with_head", "without_head"
    fixed: dict[str, float]
    per_layer: dict[str, dict[str, float]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        r = lambda x: round(x, 3) if x is not None else None  # noqa: E731
        return {"ar_step": r(self.ar_step), "verify": {k: r(v) for k, v in self.verify.items()},
                "sample": {k: r(v) for k, v in self.sample.items()}, "draft": r(self.draft),
                "draft_full_vocab": r(self.draft_full_vocab), "commit": {k: r(v) for k, v in self.commit.items()},
                "prefill": {k: r(v) for k, v in self.prefill.items()}, "fixed": {k: r(v) for k, v in self.fixed.items()},
                "per_layer": {k: {t: r(v) for t, v in d.items()} for k, d in self.per_layer.items()}}


def random_prompt(vocab: int, length: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, size=length).tolist()


def record_arrays(record: VerifyRecord) -> list[mx.array]:
    """What a verify pass keeps for its rollback, to evaluate with it."""
    return [a for r in record.layers.values() for a in (r.before, *r.inputs, r.conv_input)]


def _verify_evaluated(model: MTPModel, cache: ModelCache, block: mx.array) -> tuple[mx.array, VerifyRecord]:
    """One verify pass on ``cache``, evaluated with everything it leaves for a rollback."""
    logits, hidden, record = steps.verify(model, cache, block)
    mx.eval(logits, hidden, record_arrays(record), cache.arrays())
    return logits, record


def measure(model: MTPModel, prompt: list[int], max_depth: int, repeats: int = 3,
            params: SamplingParams | None = None, ar_tokens: int = 6,
            progress: Callable[[str], None] | None = None) -> Timings:
    """Every component of AR and of speculation at depths up to ``max_depth`` (T = 1..D+1)."""
    params = params or SamplingParams()
    say = progress or (lambda _: None)
    vocab = model.vocab_size
    rng = Rng(0)
    tokens = lambda t: mx.array([random_prompt(vocab, t, 100 + t)])  # noqa: E731

    say("prefill")
    # A short warm-up instead of a full one: a prefill is the longest call of the bench.
    for head in (False, True):
        warm = model.make_cache()
        mx.eval(*steps.prefill(model, prompt[:16], warm, head=head), warm.arrays())
    holder = {}

    def prefill_run(head: bool) -> Callable[[object], None]:
        def run(cache) -> None:
            logits, hidden = steps.prefill(model, prompt, cache, head=head)
            mx.eval(logits, hidden, cache.arrays())
            holder["last"] = (cache, logits, hidden)
        return run

    prefill_ms = {"without_head": median_ms(prefill_run(False), repeats, model.make_cache, warmup=False),
                  "with_head": median_ms(prefill_run(True), repeats, model.make_cache, warmup=False)}
    base, _, base_hidden = holder["last"]
    h_last = base_hidden[:, -1:]

    say("AR step")
    ar = pipelined_ar_ms(model, prompt, ar_tokens + 1, params)

    verify_ms, sample_ms, logits_at = {}, {}, {}
    for t in range(1, max_depth + 2):
        say(f"verify T={t}")
        block = tokens(t)

        def run_verify(fork) -> None:
            logits_at[t], _ = _verify_evaluated(model, fork, block)

        verify_ms[str(t)] = median_ms(run_verify, repeats, lambda: base.fork())
        if t == 1:
            continue  # no draft to accept: the AR step's own sampling is in its time
        p_logits = logits_at[t][0]
        drafts = mx.argmax(p_logits[: t - 1], axis=-1).astype(mx.int32)
        q = filtered_probs(p_logits[: t - 1], params)
        mx.eval(drafts, q)

        def run_sample() -> None:
            ratio, candidates = acceptance_arrays(filtered_probs(p_logits, params), q, drafts, rng)
            mx.eval(ratio, candidates)
            decide(ratio, candidates, rng)

        sample_ms[str(t)] = median_ms(run_sample, repeats)

    say("draft")
    token = tokens(1)

    def run_draft(fork) -> None:
        d_logits, chain = steps.draft(model, fork, h_last, token)
        y, probs = sample_logits(d_logits[0, -1:], params, rng)
        if model.draft_vocab is not None:  # q over the whole vocabulary, the token id of the column
            probs, y = model.draft_vocab.scatter(probs, vocab), model.draft_vocab.token_ids(y)
        mx.eval(y, probs, chain, fork.arrays())

    draft = median_ms(run_draft, repeats, lambda: base.fork())
    draft_full = None
    if model.draft_vocab is not None:
        reduced = model.draft_vocab
        model.draft_vocab = None
        try:
            draft_full = median_ms(run_draft, repeats, lambda: base.fork())
        finally:
            model.draft_vocab = reduced

    say("commit")
    block = tokens(max_depth + 1)

    def verified():
        fork = base.fork()
        return fork, _verify_evaluated(model, fork, block)[1]

    def run_commit(accepted: int) -> Callable[[tuple], None]:
        def run(arg) -> None:
            fork, record = arg
            steps.commit(fork, record, accepted)
            mx.eval(fork.arrays())
        return run

    commit = {"rollback": median_ms(run_commit(0), repeats, verified),
              "full": median_ms(run_commit(max_depth), repeats, verified)}

    say("fixed parts and one layer of each kind")
    fixed = _fixed_ms(model, prompt, max_depth, repeats, params, rng)
    per_layer = _per_layer_ms(model, base, len(prompt), max_depth, repeats)
    return Timings(ar_step=ar, verify=verify_ms, sample=sample_ms, draft=draft, draft_full_vocab=draft_full,
                   commit=commit, prefill=prefill_ms, fixed=fixed, per_layer=per_layer)


def _fixed_ms(model: MTPModel, prompt: list[int], max_depth: int, repeats: int, params: SamplingParams,
              rng: Rng) -> dict[str, float]:
    trunk = model.trunk

    def rows(t: int, sample: bool = False) -> Callable[[], None]:
        ids = mx.array([prompt[:t]])

        def run() -> None:
            logits = trunk.lm_head(trunk.body.norm(trunk.embed(ids)))
            if sample:
                y, _ = sample_logits(logits[:, -1], params, rng)
                mx.eval(y)
            mx.eval(logits)
        return run

    ids = mx.array([prompt])

    def prefill_fixed() -> None:
        h = trunk.embed(ids)
        mx.eval(h, trunk.lm_head(trunk.body.norm(h[:, -1:])))

    out = {str(t): median_ms(rows(t), repeats) for t in range(1, max_depth + 2)}
    out["ar"] = median_ms(rows(1, sample=True), repeats)
    out[PREFILL] = median_ms(prefill_fixed, repeats)
    return out


def _per_layer_ms(model: MTPModel, base, prompt_len: int, max_depth: int, repeats: int) -> dict[str, dict[str, float]]:
    """One decoder layer of each kind, called as mlx-lm's trunk calls it: at T = 1..D+1 on the
    prefilled cache, and over the whole prompt on an empty one."""
    layers = model.trunk.layers
    hidden = model.trunk.args.hidden_size
    out: dict[str, dict[str, float]] = {}
    for kind in (LINEAR, FULL):
        i = next(j for j, layer in enumerate(layers) if layer.is_linear == (kind == LINEAR))
        layer = layers[i]
        timings = {}
        for t, label in [*((t, str(t)) for t in range(1, max_depth + 2)), (prompt_len, PREFILL)]:
            x = (mx.random.normal((1, t, hidden)) * 0.1).astype(mx.bfloat16)
            mx.eval(x)

            def setup(label=label, i=i):
                return base.fork().trunk[i] if label != PREFILL else model.make_cache().trunk[i]

            def run(cache, x=x, kind=kind) -> None:
                mask = create_attention_mask(x, cache) if kind == FULL else None
                mx.eval(layer(x, mask=mask, cache=cache), cache.state)

            timings[label] = median_ms(run, repeats, setup, warmup=label != PREFILL)
        out[kind] = timings
    return out
