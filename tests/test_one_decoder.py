"""One decoder (issue 27): the one-row API is the batched decoder with one row at every depth,
held against the AR reference loop (mtplx/engine/reference.py, mlx-lm's own forward); one prompt
check, refusing ids past the vocabulary at every depth; one prefill chunk knob; no import cycle
inside mtplx/engine/."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from tiny_grammar import PIECES, grammar, grammar_tokenizer
from tiny_models import tiny_model

from mtplx.core import knobs
from mtplx.engine.batch import BatchDecoder, RowRequest
from mtplx.engine.constraints import Constraint
from mtplx.engine.reference import ar_generate
from mtplx.engine.sampling import SamplingParams
from mtplx.engine.speculative import Engine
from mtplx.errors import MtplxError

GREEDY = SamplingParams(temperature=0.0)
SAMPLED = SamplingParams(temperature=0.9, top_p=0.95, top_k=0)
PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4]


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(vocab=32, embed_scale=0.12, seed=1)


def tokens_and_logprobs(steps):
    steps = list(steps)
    return [t for s in steps for t in s.tokens], [lp for s in steps for lp in (s.logprobs or [])]


@pytest.mark.parametrize("params,seed", [(GREEDY, 0), (SAMPLED, 4), (SAMPLED, 11)])
def test_depth_0_is_the_decoders_plain_lane_and_equals_the_reference(tiny, params, seed):
    """Tokens and logprobs of Engine at depth 0 (the decoder's pipelined lane, ragged passes)
    equal the AR reference loop's (mlx-lm's forward), the same random stream, an EOS honoured."""
    want, want_lp = tokens_and_logprobs(ar_generate(tiny, PROMPT, 24, params, seed=seed, logprobs=2))
    engine = Engine(tiny, 0, params, seed=seed, logprobs=2)
    got, got_lp = tokens_and_logprobs(engine.generate(PROMPT, 24))
    assert len(want) == 24 and got == want and got_lp == want_lp
    assert engine.stats.generated == 24 and engine.stats.mode == "AR"
    eos = want[7]
    cut = want[: want.index(eos) + 1]
    assert tokens_and_logprobs(Engine(tiny, 0, params, seed=seed).generate(PROMPT, 24, eos={eos}))[0] == cut
    assert tokens_and_logprobs(ar_generate(tiny, PROMPT, 24, params, seed=seed, eos={eos}))[0] == cut


def test_a_constrained_depth_0_row_equals_the_reference():
    """A grammar row at depth 0 is not plain (its mask needs each token on the host): it takes
    the decoder's verify-only steps, which must draw as the reference loop does."""
    model = tiny_model(vocab=len(PIECES), seed=0, embed_scale=0.1)
    want = tokens_and_logprobs(ar_generate(model, [1, 2, 1], 16, SAMPLED, seed=5,
                                           constraint=Constraint(grammar_tokenizer(), grammar())))[0]
    got = tokens_and_logprobs(Engine(model, 0, SAMPLED, seed=5, constraint=Constraint(grammar_tokenizer(), grammar()))
                              .generate([1, 2, 1], 16))[0]
    assert len(want) == 16 and got == want


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_ids_past_the_vocabulary_are_refused_at_every_depth(tiny, depth):
    """Depth 0 decoded them (reading past the embedding table) while depth 2 refused them."""
    message = "token 1 of the prompt is id 32, outside this model's vocabulary"
    with pytest.raises(MtplxError, match=message):
        list(Engine(tiny, depth, GREEDY).generate([1, 32, 3], 4))
    with pytest.raises(MtplxError, match=message):
        BatchDecoder(tiny).add(RowRequest([1, 32, 3], 4, GREEDY, depth=depth))
    with pytest.raises(MtplxError, match="token 0 of the prompt is id -1"):
        list(Engine(tiny, depth, GREEDY).generate([-1], 4))
    with pytest.raises(MtplxError, match="the prompt is empty"):
        list(Engine(tiny, depth, GREEDY).generate([], 4))


def test_prefill_chunk_is_one_knob(tiny):
    """The one default (knobs.PREFILL_CHUNK) on every path; a given size cuts the prompt there and
    changes no token on this backend; a bad size is refused naming the knob."""
    assert Engine(tiny, 2, GREEDY).prefill_chunk == BatchDecoder(tiny).prefill_chunk == knobs.PREFILL_CHUNK
    row = BatchDecoder(tiny, max_batch=1, prefill_chunk=7).add(RowRequest(PROMPT, 4, GREEDY, depth=0))
    assert row.chunks == [(0, 7), (7, 14), (14, 20)]
    for depth in (0, 2):
        want = tokens_and_logprobs(Engine(tiny, depth, SAMPLED, seed=3).generate(PROMPT, 12))[0]
        for chunk in (1, 7):
            engine = Engine(tiny, depth, SAMPLED, seed=3, prefill_chunk=chunk)
            assert tokens_and_logprobs(engine.generate(PROMPT, 12))[0] == want, (depth, chunk)
    assert tokens_and_logprobs(ar_generate(tiny, PROMPT, 12, SAMPLED, seed=3, prefill_chunk=7))[0] == \
        tokens_and_logprobs(Engine(tiny, 0, SAMPLED, seed=3).generate(PROMPT, 12))[0]
    for bad in (0, 2.5, True, knobs.MAX_PREFILL_CHUNK + 1):
        for make in (Engine, BatchDecoder):
            kw = {"depth": 0, "params": GREEDY} if make is Engine else {}
            with pytest.raises(knobs.KnobError, match="prefill_chunk must be") as e:
                make(tiny, prefill_chunk=bad, **kw)
            assert e.value.param == "prefill_chunk"


def test_a_strict_greedy_depth_0_row_is_plain_only_where_passes_have_one_row(tiny):
    strict = {"params": GREEDY, "depth": 0, "strict_greedy": 0.05}
    assert BatchDecoder(tiny, max_batch=1).add(RowRequest(PROMPT, 4, **strict)).plain
    assert not BatchDecoder(tiny, max_batch=2).add(RowRequest(PROMPT, 4, **strict)).plain


def engine_imports() -> dict[str, set[str]]:
    """mtplx.engine module -> the mtplx.engine modules it imports anywhere (top level, inside a
    function, under TYPE_CHECKING: import-linter counts them all)."""
    root = Path(__file__).resolve().parents[1] / "mtplx" / "engine"
    names = {p.stem for p in root.glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for name in names:
        out = set()
        for node in ast.walk(ast.parse((root / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "mtplx.engine":
                    out |= {a.name for a in node.names if a.name in names}
                elif node.module.startswith("mtplx.engine."):
                    out.add(node.module.split(".")[2])
            elif isinstance(node, ast.Import):
                out |= {a.name.split(".")[2] for a in node.names if a.name.startswith("mtplx.engine.")}
        graph[name] = out & names
    return graph


def test_no_import_cycle_inside_the_engine():
    graph = engine_imports()
    assert {"batch", "speculative", "strict", "row", "reference"} <= set(graph)
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join(path + [node, nxt])
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
