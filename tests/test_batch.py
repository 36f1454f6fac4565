"""The batched decoder (mtplx/engine/batch.py): a row in a batch decodes as it would alone.

- greedy: every row's tokens equal that prompt's greedy AR output (bf16 graft of the fixture,
  4 prompts of different lengths, depths 0-3 and mixed; the demo on one short case);
- batch invariance: a seeded, sampled request gives the same tokens alone and inside a batch
  of 4 (bf16 graft: a ragged pass computes each row as it would alone);
- caches: after every step, every cache of every row equals an AR pass over the tokens it
  consumed, with rows joining mid-run (chunked prefill), leaving, and accepting differently;
- per row: a grammar constraint, logprobs and a prompt cache give inside a batch exactly what
  they give alone;
- bad input is refused with one clear error.
The law of every row is tested in tests/test_batch_law.py.
"""

from __future__ import annotations

import mlx.core as mx
import pytest

import mtplx
from cache_compare import compare
from mtplx.engine.batch import BatchDecoder, RowRequest
from mtplx.engine.constraints import Constraint
from mtplx.engine.reference import ar_generate
from mtplx.engine.sampling import SamplingParams
from mtplx.engine.speculative import Engine
from mtplx.errors import MtplxError
from mtplx.model.mtp_model import ModelCache
from tiny_grammar import PIECES, grammar, grammar_tokenizer
from test_moe import moe_artifact  # noqa: F401 - the fixture
from tiny_models import tiny_model

GREEDY = SamplingParams(temperature=0.0)
SAMPLED = SamplingParams(temperature=0.9, top_p=0.95, top_k=0)


@pytest.fixture(scope="module")
def bf16(grafted_bf16):
    return mtplx.load(str(grafted_bf16[0]))


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(vocab=32, embed_scale=0.12, seed=1)


def alone(model, prompt, n, depth, params=GREEDY, seed=0, **kw):
    engine = Engine(model, depth, params, seed=seed, **{k: v for k, v in kw.items() if k in ("constraint", "logprobs")})
    steps = list(engine.generate(prompt, n, prompt_cache=kw.get("prompt_cache")))
    return [t for s in steps for t in s.tokens], steps


def run_batch(model, requests, max_batch=8, prefill_chunk=512):
    decoder = BatchDecoder(model, max_batch=max_batch, prefill_chunk=prefill_chunk)
    rows = [decoder.add(r) for r in requests]
    emitted = {r.id: [] for r in rows}
    while len(decoder):
        for row, e in decoder.step():
            emitted[row.id].append(e)
    return rows, emitted


def bf16_prompts(tok):
    texts = ["def f(x):\n", "import os\nimport sys\n\n\ndef main(argv):\n    ",
             "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n",
             "# A list of primes\nprimes = [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71]\n"]
    return [tok.encode(t) for t in texts]


@pytest.fixture(scope="module")
def greedy_ar(bf16):
    model, tok = bf16
    prompts = bf16_prompts(tok)
    assert len({len(p) for p in prompts}) == 4
    # The AR reference loop (mlx-lm's own forward), not the decoder under test.
    return prompts, [[t for s in ar_generate(model, p, 16, GREEDY) for t in s.tokens] for p in prompts]


@pytest.mark.parametrize("depths", [(0, 0, 0, 0), (1, 1, 1, 1), (2, 2, 2, 2), (3, 3, 3, 3), (0, 1, 2, 3)])
def test_greedy_rows_equal_greedy_ar(bf16, greedy_ar, depths):
    model, _ = bf16
    prompts, ar = greedy_ar
    rows, _ = run_batch(model, [RowRequest(p, 16, GREEDY, depth=d) for p, d in zip(prompts, depths)])
    for row, want in zip(rows, ar):
        assert row.emitted == want, f"row {row.id} at depth {row.depth}"
    if max(depths):
        assert any(sum(r.stats.accepted) for r in rows), "no draft was accepted: nothing was tested"


@pytest.mark.slow
def test_greedy_rows_equal_greedy_ar_on_the_demo(demo):
    model, tok = demo
    prompts = [tok.encode("def add(a, b):\n"), tok.encode("import numpy as np\n\nx = np.")]
    ar = [alone(model, p, 8, 0)[0] for p in prompts]
    rows, _ = run_batch(model, [RowRequest(p, 8, GREEDY, depth=2) for p in prompts])
    assert [r.emitted for r in rows] == ar


def test_a_seeded_request_is_the_same_alone_and_in_a_batch(bf16):
    model, tok = bf16
    prompts = bf16_prompts(tok)
    mine = RowRequest(prompts[1], 20, SAMPLED, depth=2, seed=7)
    (solo,), _ = run_batch(model, [mine])
    others = [RowRequest(prompts[0], 24, SamplingParams(temperature=1.2), depth=2, seed=1),
              RowRequest(prompts[2], 12, GREEDY, depth=2),
              RowRequest(prompts[3], 20, SamplingParams(temperature=0.6, top_p=0.8), depth=2, seed=3)]
    rows, _ = run_batch(model, [others[0], RowRequest(**vars(mine)), *others[1:]])
    assert rows[1].emitted == solo.emitted
    assert solo.stats.steps > 1 and any(r.emitted != solo.emitted for r in rows if r is not rows[1])


class Cycle:
    """A depth policy that walks through ``depths`` (0 included: plain steps)."""

    def __init__(self, depths):
        self.depths, self.i, self.max_depth = depths, -1, max(depths)

    def choose(self, context: int = 0):
        self.i += 1
        return self.depths[self.i % len(self.depths)]

    def observe(self, drafted, accepted):
        pass


def test_every_cache_of_every_row_equals_ar_after_every_step(tiny):
    model = tiny
    decoder = BatchDecoder(model, max_batch=3, prefill_chunk=5)
    rows = [decoder.add(RowRequest([1, 2, 3], 40, SAMPLED, depth=3, seed=1)),
            decoder.add(RowRequest(list(range(4, 17)), 40, SAMPLED, depth=Cycle([2, 0, 1, 0]), seed=2)),
            decoder.add(RowRequest([5, 9], 40, GREEDY, depth=1))]
    late = None
    accepted: dict[int, set[int]] = {}
    for step in range(16):
        if step == 3:  # a long prompt joins mid-run; more rows than slots: it waits for one
            late = decoder.add(RowRequest(list(range(20, 32)), 40, SAMPLED, depth=2, seed=4))
            assert late.cache is None and late in decoder.rows
        if step == 6:
            decoder.remove(rows[2])  # leaves: its slot goes to the late row
            assert rows[2].done and rows[2].cache is None
        for row, e in decoder.step():
            if e.drafted:
                accepted.setdefault(row.id, set()).add(e.accepted)
        for row in decoder.rows:
            if row.cache is not None and row.consumed:  # (a joining row may not have had a piece yet)
                compare(model, row.cache, row.consumed)
    assert late is not None and late.emitted and late.stats.cached_tokens == 0
    assert any(len(a) > 1 for a in accepted.values()), "every step accepted the same count"
    assert not decoder.step() or True  # still runs after rows left


def test_a_constrained_row_equals_itself_alone(tiny):
    model = tiny_model(vocab=len(PIECES), seed=0, embed_scale=0.1)
    want, _ = alone(model, [1, 2, 1], 12, 2, SAMPLED, seed=5, constraint=Constraint(grammar_tokenizer(), grammar()))
    rows, _ = run_batch(model, [RowRequest([3, 3], 12, SAMPLED, depth=2, seed=1),
                                RowRequest([1, 2, 1], 12, SAMPLED, depth=2, seed=5,
                                           constraint=Constraint(grammar_tokenizer(), grammar())),
                                RowRequest([4], 12, SAMPLED, depth=1, seed=2)])
    assert rows[1].emitted == want


def test_logprobs_of_a_row_equal_the_row_alone(tiny):
    want_tokens, want_steps = alone(tiny, [1, 2, 3, 4], 10, 2, SAMPLED, seed=3, logprobs=3)
    rows, emitted = run_batch(tiny, [RowRequest([7, 8], 10, SAMPLED, depth=3, seed=1),
                                     RowRequest([1, 2, 3, 4], 10, SAMPLED, depth=2, seed=3, logprobs=3)])
    assert rows[1].emitted == want_tokens
    got = [lp for e in emitted[rows[1].id] for lp in e.logprobs]
    assert got == [lp for s in want_steps for lp in s.logprobs]
    assert all(e.logprobs is None for e in emitted[rows[0].id])


def test_a_row_with_a_prompt_cache_equals_itself_alone(tiny):
    history = [1, 5, 9, 2, 6]
    prompt = history + [3, 3, 7]

    def warm():
        cache = mtplx.make_prompt_cache(tiny)
        alone(tiny, history, 4, 2, prompt_cache=cache)
        return cache

    solo_cache, batch_cache = warm(), warm()
    want, _ = alone(tiny, prompt, 12, 2, SAMPLED, seed=9, prompt_cache=solo_cache)
    rows, _ = run_batch(tiny, [RowRequest([2, 2, 2], 12, SAMPLED, depth=1, seed=1),
                               RowRequest(prompt, 12, SAMPLED, depth=2, seed=9, prompt_cache=batch_cache)])
    assert rows[1].emitted == want
    assert rows[1].stats.cached_tokens == len(history) - 1  # the snapshot before the history's last token
    assert batch_cache.tokens == solo_cache.tokens == prompt + want[: len(solo_cache.tokens) - len(prompt)]
    compare(tiny, batch_cache.cache, batch_cache.tokens)


@pytest.mark.parametrize("request_kw, needle", [
    ({"prompt": []}, "empty"),
    ({"prompt": [1, 99]}, "outside this model's vocabulary"),
    ({"depth": -1}, "depth"),
    ({"logprobs": -2}, "logprobs"),
])
def test_bad_requests_are_refused(tiny, request_kw, needle):
    kw = {"prompt": [1, 2], "max_tokens": 4, "params": GREEDY} | request_kw
    with pytest.raises(MtplxError, match=needle):
        BatchDecoder(tiny).add(RowRequest(**kw))


def test_a_prompt_cache_serves_one_row_at_a_time(tiny):
    decoder = BatchDecoder(tiny)
    cache = mtplx.make_prompt_cache(tiny)
    decoder.add(RowRequest([1, 2], 4, GREEDY, prompt_cache=cache))
    with pytest.raises(MtplxError, match="already in use"):
        decoder.add(RowRequest([1, 3], 4, GREEDY, prompt_cache=cache))
    assert BatchDecoder(tiny).add(RowRequest([1], 0, GREEDY)).done


def test_a_moe_row_is_the_same_alone_and_in_a_batch(moe_artifact):
    """MoE layers (4-bit experts): a batch's pass routes many more tokens at once (mlx-lm sorts
    them by expert past 64 routed rows) and a row's result must still not change."""
    model, tok = mtplx.load(str(moe_artifact))
    prompts = [tok.encode(t) for t in ("def add(a, b):\n    return", "import os\nimport sys\n\nx = [1, 2, 3, 4, 5]\n",
                                       "class A:\n    pass\n\n\nclass B(A):\n", "# sum of squares\n")]
    mine = RowRequest(prompts[0], 12, SAMPLED, depth=2, seed=4)
    (solo,), _ = run_batch(model, [mine])
    rows, _ = run_batch(model, [RowRequest(p, 12, SAMPLED, depth=2, seed=i) for i, p in enumerate(prompts[1:])]
                        + [RowRequest(**vars(mine))])
    assert rows[-1].emitted == solo.emitted


def test_plain_rows_decode_as_alone_and_leave_caches_as_ar(tiny):
    """Plain rows (depth 0, the pipelined lane: a token is fed before the host reads it) give
    the tokens, logprobs and prompt cache of Engine's own AR loop alone, beside a drafting row,
    and after every step their caches equal an AR pass over what they consumed; a row with a
    prompt cache keeps the head in step, so a later MTP call on that cache decodes as alone."""
    history = [1, 5, 9, 2, 6]

    def warm():
        cache = mtplx.make_prompt_cache(tiny)
        alone(tiny, history, 4, 0, prompt_cache=cache)
        return cache

    solo_cache, batch_cache = warm(), warm()
    prompt = history + [3, 3, 7]
    want_lp_tokens, want_lp_steps = alone(tiny, [4, 4, 8], 9, 0, SAMPLED, seed=3, logprobs=2)
    want_pc, _ = alone(tiny, prompt, 11, 0, SAMPLED, seed=9, prompt_cache=solo_cache)
    want_greedy, _ = alone(tiny, [2, 7], 13, 0)
    eos = want_greedy[5]
    want_eos = want_greedy[: want_greedy.index(eos) + 1]

    decoder = BatchDecoder(tiny, max_batch=4, prefill_chunk=4)
    rows = [decoder.add(RowRequest([4, 4, 8], 9, SAMPLED, depth=0, seed=3, logprobs=2)),
            decoder.add(RowRequest(prompt, 11, SAMPLED, depth=0, seed=9, prompt_cache=batch_cache)),
            decoder.add(RowRequest([2, 7], 13, GREEDY, depth=0, eos=frozenset({eos}))),
            decoder.add(RowRequest([1, 2, 3], 20, SAMPLED, depth=2, seed=1))]
    assert [r.plain for r in rows] == [True, True, True, False]
    got_lp = []
    while len(decoder):
        for row, e in decoder.step():
            if row is rows[0]:
                got_lp += e.logprobs
        for row in decoder.rows:
            if row.plain and row.cache is not None and not row.prefilling:
                # the head is compared only where it is kept (the prompt-cache row)
                compare_flushed(tiny, row.cache, row.consumed) if row.keeps_head else compare_trunk(tiny, row)
    assert rows[0].emitted == want_lp_tokens
    assert got_lp == [lp for s in want_lp_steps for lp in s.logprobs]
    assert rows[1].emitted == want_pc
    assert batch_cache.tokens == solo_cache.tokens == prompt + want_pc
    assert rows[2].emitted == want_eos and rows[2].stats.generated == len(want_eos)
    # the prompt cache's head is in step: an MTP call on it decodes as the same call alone
    follow = batch_cache.tokens + [5, 1]
    again, _ = alone(tiny, follow, 8, 2, SAMPLED, seed=4, prompt_cache=solo_cache)
    rows2, _ = run_batch(tiny, [RowRequest(follow, 8, SAMPLED, depth=2, seed=4, prompt_cache=batch_cache)])
    assert rows2[0].emitted == again
    compare_flushed(tiny, batch_cache.cache, batch_cache.tokens)


def compare_flushed(model, cache, consumed):
    """Every cache, the head's rows waiting in the backlog written first: the head then holds a
    row for every consumed position but the last, as an AR pass leaves it."""
    c = cache.fork()
    if c.backlog_tokens:
        model.fill_head(c.backlog[:, :-1], mx.array([c.backlog_tokens]), c)
    assert c.head[0].offset == len(consumed) - 1
    compare(model, c, consumed)


def compare_trunk(model, row):
    """A plain row without a prompt cache: the trunk's caches only (its head is never read)."""
    compare(model, ModelCache(trunk=row.cache.trunk, head=[]), row.consumed)


@pytest.mark.parametrize("lengths", [(1, 1, 1), (3, 3, 3), (1, 3, 2)])
def test_a_ragged_pass_computes_each_row_as_alone_bit_for_bit(bf16, lengths):
    """model/rows.py: rows of one length share the Gated-DeltaNet conv and recurrence (stacked
    on the batch axis), rows of different lengths run them one by one; either way every row's
    hidden and caches equal that row's pass alone, bit for bit, on this backend."""
    from mtplx.engine.cache import snapshot
    from mtplx.model import rows as ragged

    model, _ = bf16

    def prompted():  # three rows at different offsets (built twice: KV buffers are written in place)
        out = []
        for i in range(3):
            c = model.make_cache()
            model.trunk_hidden(mx.array([list(range(3, 12 + 5 * i))]), c)
            out.append(c)
        return out

    caches, solo = prompted(), prompted()
    blocks = [mx.array([[7 + i + j for j in range(n)]]) for i, n in enumerate(lengths)]
    together, _ = model.trunk_rows([ragged.Segment(b, c.trunk) for b, c in zip(blocks, caches)])
    where = ragged.spans(lengths)
    for (s, e), b, c, alone_cache in zip(where, blocks, caches, solo):
        hidden, _ = model.trunk_rows([ragged.Segment(b, alone_cache.trunk)])
        assert mx.array_equal(together[:, s:e], hidden).item()
        got, want = snapshot(c), snapshot(alone_cache)
        assert got.keys() == want.keys() and all(mx.array_equal(got[k], want[k]).item() for k in got)


class _FailingPolicy:
    """A depth-2 policy whose bookkeeping raises on its third step: host work of one row."""

    max_depth = 2

    def __init__(self):
        self.steps = 0

    def choose(self, context: int = 0) -> int:
        return 2

    def observe(self, drafted: int, accepted: int) -> None:
        self.steps += 1
        if self.steps == 3:
            raise RuntimeError("this row's bookkeeping failed")


def test_isolated_rows_a_failing_row_ends_alone(tiny) -> None:
    """With isolate_rows (the server's decoder) a row whose own host work raises ends with the
    error in row.error; its neighbours' tokens equal their solo tokens. Without it, it raises."""
    prompts = [[1, 2, 3], [4, 5, 6, 7], [8, 9]]
    solo = [run_batch(tiny, [RowRequest(p, 12, SAMPLED, depth=2, seed=i)])[1] for i, p in enumerate(prompts)]
    decoder = BatchDecoder(tiny, max_batch=4, isolate_rows=True)
    rows = [decoder.add(RowRequest(p, 12, SAMPLED, depth=_FailingPolicy() if i == 1 else 2, seed=i))
            for i, p in enumerate(prompts)]
    emitted = {r.id: [] for r in rows}
    while len(decoder):
        for row, e in decoder.step():
            emitted[row.id].append(e)
    assert isinstance(rows[1].error, RuntimeError) and rows[1].done
    for i in (0, 2):
        assert rows[i].error is None
        assert [t for e in emitted[rows[i].id] for t in e.tokens] == \
            [t for e in next(iter(solo[i].values())) for t in e.tokens]
    with pytest.raises(RuntimeError, match="bookkeeping"):
        run_batch(tiny, [RowRequest(prompts[1], 12, SAMPLED, depth=_FailingPolicy(), seed=1)])
