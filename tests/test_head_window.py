"""The head's window (knobs.head_window, ModelCache.head_start): a cold prefill gives the MTP
head rows for the prompt's last W positions only, so the trunk's last layer never runs for the
earlier ones. The head attends to its own rows by relative position, so this may change what
it drafts, never the output: greedy text equals AR's, every cache equals an AR pass whose head
starts where the window did, a prompt cache reused and extended keeps the head contiguous, and
the disk tier's files keep where it starts."""

from __future__ import annotations

import pytest

from cache_compare import compare
from mtplx.core import knobs
from mtplx.engine import steps
from mtplx.engine.batch import BatchDecoder, RowRequest
from mtplx.engine.prompt_cache import PromptCache
from mtplx.engine.reference import ar_generate
from mtplx.engine.sampling import SamplingParams
from tiny_models import tiny_model

WINDOW = 12
PROMPT = [(5 * i + 3) % 31 + 1 for i in range(70)]
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def m():
    return tiny_model(vocab=32, embed_scale=0.12, seed=1)


@pytest.fixture
def window(monkeypatch):
    monkeypatch.setenv("MTPLX_HEAD_WINDOW", str(WINDOW))


def ar(m, prompt, n):
    return [t for e in ar_generate(m, prompt, n, GREEDY) for t in e.tokens]


def covers(cache) -> bool:
    backlog = cache.backlog.shape[1] if cache.backlog is not None else 0
    return cache.head_start + cache.head[0].offset + backlog == cache.offset


def test_a_cold_prefill_keeps_the_last_w_positions_and_decodes_exactly(m, window):
    decoder = BatchDecoder(m, max_batch=1, prefill_chunk=16)
    row = decoder.add(RowRequest(PROMPT, 30, GREEDY, depth=2, seed=3))
    checked = 0
    while not row.done:
        decoder.step()
        if row.done or row.prefilling:
            continue
        assert row.cache.head_start == len(PROMPT) - WINDOW and covers(row.cache)
        compare(m, row.cache, row.consumed)
        checked += 1
    assert checked >= 5
    assert row.emitted == ar(m, PROMPT, 30)
    assert sum(row.stats.drafted) >= 50  # every step drafted from the windowed head, and rolled back


def test_the_step_functions_prefill_windows_alike(m, window):
    cache = m.make_cache()
    steps.prefill(m, PROMPT, cache, head=True, chunk=16)
    assert cache.head_start == len(PROMPT) - WINDOW and cache.head[0].offset == WINDOW - 1 and covers(cache)
    compare(m, cache, PROMPT)


def test_no_window_and_short_prompts_fill_every_position(m, monkeypatch):
    monkeypatch.setenv("MTPLX_HEAD_WINDOW", "0")
    cache = m.make_cache()
    steps.prefill(m, PROMPT, cache, head=True, chunk=16)
    assert cache.head_start == 0 and cache.head[0].offset == len(PROMPT) - 1
    monkeypatch.setenv("MTPLX_HEAD_WINDOW", str(len(PROMPT)))
    cache = m.make_cache()
    steps.prefill(m, PROMPT, cache, head=True, chunk=16)
    assert cache.head_start == 0 and covers(cache)


def test_a_reused_prompt_cache_extends_the_head_without_a_gap(m, window):
    """Turn 2 reuses turn 1's cache: its new tokens all get head rows (the head is not empty),
    and a restore to an earlier snapshot, before or inside the window, stays consistent."""
    pc = PromptCache(m, snapshot_interval=24)
    first = [t for s in _generate(m, PROMPT, 6, pc) for t in s]
    assert pc.cache.head_start == len(PROMPT) - WINDOW and pc.consistent()
    turn2 = PROMPT + first + [7, 8, 9] * 10
    second = [t for s in _generate(m, turn2, 6, pc) for t in s]
    assert pc.cache.head_start == len(PROMPT) - WINDOW and pc.consistent()
    assert second == ar(m, turn2, 6)
    compare(m, pc.cache, pc.tokens)
    early = pc.copy_prefix(24)  # a snapshot before the window: no head rows yet
    assert early.cache.head_start == 24 and early.cache.head[0].offset == 0 and early.consistent()
    pc.restore(len(PROMPT) - 1)  # the end-of-prompt snapshot, inside the window
    assert pc.consistent() and pc.cache.head_start == len(PROMPT) - WINDOW


def test_the_disk_tier_keeps_where_the_head_starts(m, window, tmp_path):
    from mtplx.engine import prompt_cache_file

    pc = PromptCache(m)
    for _ in _generate(m, PROMPT, 4, pc):
        pass
    path = prompt_cache_file.save_prompt_cache(tmp_path / "pc.safetensors", pc)
    loaded = prompt_cache_file.load_prompt_cache(path, m)
    assert loaded.cache.head_start == pc.cache.head_start == len(PROMPT) - WINDOW and loaded.consistent()
    assert [t for s in _generate(m, PROMPT + [5, 6], 4, loaded) for t in s] == ar(m, PROMPT + [5, 6], 4)


def test_a_bad_window_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv("MTPLX_HEAD_WINDOW", "lots")
    with pytest.raises(knobs.KnobError, match="MTPLX_HEAD_WINDOW='lots' is not a number of tokens"):
        knobs.head_window()


def _generate(m, prompt, n, pc):
    decoder = BatchDecoder(m, max_batch=1, prefill_chunk=16)
    row = decoder.add(RowRequest(prompt, n, GREEDY, depth=2, seed=1, prompt_cache=pc))
    while not row.done:
        for r, emitted in decoder.step():
            yield emitted.tokens
