"""Prompt caches: a cache hit changes nothing about the output, and the caches after a cached
turn equal those of a cold prefill of the same tokens.

- greedy: with the cache, every turn's output equals the cache-less output, at depths 0-3 and
  with the depth changing between turns (an AR turn, then MTP turns, on the same cache);
- law: on a cache hit, the law of the first three tokens equals the exact AR law (chi-square,
  same power as tests/test_engine_law.py), at depth 0 and depth 2;
- caches: after each cached turn they equal an AR pass over the tokens the cache records;
- divergence: an edited last message reuses the snapshot before it, a regenerated reply the one
  before the prompt's last token, and a chat template that re-renders the previous reply
  (Qwen's drops the <think> block) reuses everything before that reply;
- files: a saved cache continues exactly like the live one; a truncated file, one from another
  model and one from another mtplx version are refused with one clear error.
"""

from __future__ import annotations

import mlx.core as mx
import pytest

import mtplx
from cache_compare import compare
from mtplx.engine.batch import BatchDecoder, RowRequest
from mtplx.engine.prompt_cache import PromptCache, common_prefix
from mtplx.engine.sampling import SamplingParams
from mtplx.engine.speculative import Engine
from mtplx.errors import MtplxError
from test_engine_law import ALPHA, LAYERS, PARAMS, VOCAB, exact_ar_law, gof_pvalue
from tiny_models import tiny_model

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def model():
    return tiny_model(vocab=32, embed_scale=0.12, seed=1)


def run(model, prompt, depth, n, cache=None, params=GREEDY, seed=0):
    engine = Engine(model, depth, params, seed=seed)
    tokens = [t for step in engine.generate(prompt, n, prompt_cache=cache) for t in step.tokens]
    return tokens, engine


def test_cached_turns_equal_cold_and_the_caches_match(model):
    cache = mtplx.make_prompt_cache(model)
    history = [3, 1, 4, 1, 5, 9, 2, 6]
    for turn, depth in enumerate([0, 2, 3, 1, 2]):
        cold, _ = run(model, history, depth, 12)
        hot, engine = run(model, history, depth, 12, cache)
        assert hot == cold, f"turn {turn} (depth {depth}) differs with the cache"
        if turn:
            assert engine.stats.cached_tokens >= len(history) - 8, "the cache served too little"
        assert cache.tokens == (history + hot)[: cache.cache.offset]
        compare(model, cache.cache, cache.tokens)
        history = history + hot + [7, 7, turn % 5]


def test_cache_reuse_counts_and_divergence(model):
    """Extension reuses everything cached; an edit inside the last message falls back to the
    snapshot before it; a regenerate reuses all but the prompt's last token."""
    cache = PromptCache(model, snapshot_interval=8)
    first = list(range(1, 21))  # snapshots at 8, 16 and 19
    out, _ = run(model, first, 2, 6, cache)
    assert sorted(cache.snapshots) == [8, 16, 19]
    assert cache.reusable(first + out + [5]) == len(cache.tokens)
    edited = first[:12] + [30] + first[13:]
    assert cache.reusable(edited) == 8
    assert cache.reusable(first) == 19
    again, engine = run(model, first, 2, 6, cache)
    assert again == out and engine.stats.cached_tokens == 19
    cold, _ = run(model, edited, 2, 6)
    hot, engine = run(model, edited, 2, 6, cache)
    assert hot == cold and engine.stats.cached_tokens == 8
    compare(model, cache.cache, cache.tokens)
    assert all(s <= 8 or s >= 12 for s in cache.snapshots)


def test_snapshots_are_bounded(model):
    """Past the bound, snapshots go from the middle: the smallest position (the prefix most
    conversations share) and the latest (a regenerated reply) stay."""
    cache = PromptCache(model, snapshot_interval=2, max_snapshots=3)
    run(model, list(range(1, 20)), 1, 2, cache)
    assert len(cache.snapshots) == 3
    assert min(cache.snapshots) == 2 and max(cache.snapshots) == 18


def test_interrupted_update_starts_cold(model):
    """A cache advanced without its tokens recorded (a generation killed mid-step) is not
    trusted: the next call starts cold and still answers right."""
    cache = mtplx.make_prompt_cache(model)
    prompt = [2, 7, 1, 8, 2, 8]
    run(model, prompt, 2, 5, cache)
    from mtplx.engine import steps

    steps.verify(model, cache.cache, mx.array([[1, 2, 3]]))  # advanced, never committed
    assert not cache.consistent()
    follow = cache.tokens + [4, 4]
    hot, engine = run(model, follow, 2, 8, cache)
    assert engine.stats.cached_tokens == 0 and hot == run(model, follow, 2, 8)[0]


@pytest.mark.parametrize("depth", [0, 2])
def test_law_on_a_cache_hit(depth):
    """The law of the first three tokens after a cached prefix equals the exact AR law."""
    law_model = tiny_model(vocab=VOCAB, embed_scale=0.12, layers=LAYERS)  # test_engine_law's model
    prefix, prompt = [1, 4], [1, 4, 2]
    base = mtplx.make_prompt_cache(law_model)
    run(law_model, prefix, 2, 1, base)  # MTP leaves its first token pending: holds the prefix alone
    law = exact_ar_law(law_model, prompt, 3)
    samples, served = [], set()
    for start in range(0, 1500, 50):  # 50 rows a batch, each on its own copy of the cache
        decoder = BatchDecoder(law_model, max_batch=50)
        rows = [decoder.add(RowRequest(prompt, 3, PARAMS, depth=depth, seed=depth * 7919 + i,
                                       prompt_cache=base.copy_prefix(base.reusable(prompt))))
                for i in range(start, start + 50)]
        while len(decoder):
            decoder.step()
        served |= {row.stats.cached_tokens for row in rows}
        samples += [tuple(row.emitted) for row in rows]
    assert served == {2}, "the cache was not hit"
    assert gof_pvalue(samples, law) > ALPHA


def test_chat_turns_reuse_the_history(demo_bf16):
    """Through the API with chat messages: the template drops the <think> block of the previous
    reply, and the cache still reuses everything before that reply."""
    model, tok = demo_bf16  # the demo's bf16 trunk: a quarter of the 4-bit demo's time
    cache = mtplx.make_prompt_cache(model)
    messages = [{"role": "user", "content": "def add(a, b):"}]
    for turn in range(2):
        kw = dict(max_tokens=10, temperature=0.0, depth=2, enable_thinking=False)
        hot = list(mtplx.stream_generate(model, tok, messages, prompt_cache=cache, **kw))
        cold = "".join(r.text for r in mtplx.stream_generate(model, tok, messages, **kw))
        assert "".join(r.text for r in hot) == cold
        if turn:
            first_prompt = hot[-1].prompt_tokens
            assert hot[-1].cached_tokens >= 14, hot[-1].cached_tokens  # the whole first user turn
        messages += [{"role": "assistant", "content": cold}, {"role": "user", "content": "class Stack:"}]
    assert first_prompt > hot[-1].cached_tokens


def test_saved_cache_continues_like_the_live_one(model, tmp_path):
    cache = mtplx.make_prompt_cache(model)
    prompt = [5, 3, 5, 8, 9, 7, 9, 3]
    out, _ = run(model, prompt, 2, 6, cache)
    path = mtplx.save_prompt_cache(tmp_path / "chat.safetensors", cache)
    loaded = mtplx.load_prompt_cache(path, model)
    assert loaded.tokens == cache.tokens and sorted(loaded.snapshots) == sorted(cache.snapshots)
    follow = prompt + out + [2, 3]
    live, e1 = run(model, follow, 3, 8, cache)
    again, e2 = run(model, follow, 3, 8, loaded)
    assert live == again and e1.stats.cached_tokens == e2.stats.cached_tokens > 0


def test_bad_cache_files_are_refused(model, tmp_path):
    cache = mtplx.make_prompt_cache(model)
    run(model, [1, 2, 3, 4], 1, 3, cache)
    path = mtplx.save_prompt_cache(tmp_path / "c.safetensors", cache)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(MtplxError, match="cannot be read|damaged"):
        mtplx.load_prompt_cache(truncated, model)
    with pytest.raises(MtplxError, match="another model"):
        mtplx.load_prompt_cache(path, tiny_model(vocab=16, seed=3))
    arrays, meta = mx.load(str(path), return_metadata=True)
    mx.save_safetensors(str(tmp_path / "old.safetensors"), arrays, metadata={**meta, "mtplx_version": "0.0.1"})
    with pytest.raises(MtplxError, match="written by mtplx 0.0.1"):
        mtplx.load_prompt_cache(tmp_path / "old.safetensors", model)
    with pytest.raises(MtplxError, match="another model"):
        run(tiny_model(vocab=16, seed=3), [1, 2], 0, 1, cache)


def test_lru_shares_prefixes_and_stays_in_its_bound(model):
    from mtplx.engine.prompt_cache import PromptCacheLRU

    lru = PromptCacheLRU(model, max_bytes=1 << 30)
    system = [9, 8, 7, 6, 5, 4, 3, 2]
    a = lru.checkout(system + [1])
    run(model, system + [1], 2, 4, a)
    assert lru.misses == 1
    lru.checkin(a)
    b = lru.checkout(system + [2])  # diverges inside a's tokens: a copy of the shared prefix
    assert b is not a and len(lru) == 1 and b.reusable(system + [2]) == len(system)
    taken = lru.checkout(a.tokens + [3])  # extends a: a itself, taken out of the LRU
    assert taken is a and len(lru) == 0
    again = lru.checkout(a.tokens + [3])  # a is checked out: never handed to two requests
    assert again is not a and not again.tokens
    out, engine = run(model, system + [2], 1, 4, b)
    assert engine.stats.cached_tokens == len(system) and out == run(model, system + [2], 1, 4)[0]
    lru.checkin(b)
    lru.checkin(a)
    assert len(lru) == 2 and lru.hits == 2

    tiny = PromptCacheLRU(model, max_bytes=a.nbytes + b.nbytes - 1)
    tiny.checkin(a)
    tiny.checkin(b)
    assert len(tiny) == 1 and tiny.evictions == 1 and tiny.nbytes <= tiny.max_bytes


def test_conversation_appends_each_turn_to_what_the_model_saw(demo):
    """The terminal chat's tokens only grow: turn 2's prompt is turn 1's prompt, the reply as
    generated (its <think> block kept, which the template would drop), the template's closing of
    the turn, and the new question; a reply cut short gets the end-of-turn token added."""
    from mtplx.generation.conversation import Conversation

    _, tok = demo
    conv = Conversation(tok)
    messages = [{"role": "user", "content": "def add(a, b):"}]
    first = conv.prompt(messages, enable_thinking=False)
    reply = tok.encode("    return a + b", add_special_tokens=False)  # cut short: no <|im_end|>
    conv.add_reply(reply)
    messages += [{"role": "assistant", "content": "    return a + b"}, {"role": "user", "content": "class Stack:"}]
    second = conv.prompt(messages, enable_thinking=False)
    assert second[: len(first) + len(reply)] == first + reply
    assert tok.decode(second[len(first) + len(reply):]) == (
        "<|im_end|>\n<|im_start|>user\nclass Stack:<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    conv.drop_turn()
    assert conv.ids == first + reply


def test_bench_chat_turns_reports_both_columns(demo_bf16_path, tmp_path):
    """`mtplx bench --chat-turns`: each turn after the first is served mostly from the cache, and
    the cold column times the same prompt."""
    import json

    from click.testing import CliRunner

    from mtplx.cli.commands import cli

    out = tmp_path / "turns.json"
    result = CliRunner().invoke(cli, ["bench", "--model", str(demo_bf16_path), "--chat-turns", "2", "--depths", "0,2",
                                      "--max-tokens", "4", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "with the prompt cache" in result.output and "TTFT cold" in result.output
    turns = json.loads(out.read_text())["chat_turns"]["turns"]
    assert [t["turn"] for t in turns] == [1, 2]
    assert turns[0]["cached_tokens"] == 0
    for before, t in zip(turns, turns[1:]):
        assert t["prompt_tokens"] > before["prompt_tokens"]
        assert before["prompt_tokens"] <= t["cached_tokens"] < t["prompt_tokens"]


@pytest.mark.parametrize("args, needle", [
    (["--shape", "qwen3.5-4b", "--chat-turns", "2"], "--chat-turns or --shape"),
    (["--chat-turns", "0"], "--chat-turns"),
])
def test_bench_chat_turns_bad_options(args, needle):
    from click.testing import CliRunner

    from mtplx.cli.commands import cli

    result = CliRunner().invoke(cli, ["bench", *args])
    assert result.exit_code != 0 and needle in result.output and "Traceback" not in result.output


def test_an_array_prompt_uses_the_cache_like_a_list(demo_bf16):
    """Token ids as an array (numpy here) are a prompt like their list; with a prompt cache too."""
    import numpy as np

    model, tok = demo_bf16  # the demo's bf16 trunk: a quarter of the 4-bit demo's time
    ids = tok.encode("def add(a, b):")
    kw = dict(max_tokens=6, temperature=0.0, depth=2)
    cold = mtplx.generate(model, tok, ids, **kw)
    cache = mtplx.make_prompt_cache(model)
    assert mtplx.generate(model, tok, np.array(ids), prompt_cache=cache, **kw) == cold
    assert mtplx.generate(model, tok, np.array(ids), prompt_cache=cache, **kw) == cold


def test_conversations_sharing_only_a_system_prompt_reuse_it(demo_bf16):
    """Issue 21: a snapshot is taken at the end of the system prefix, so a second conversation
    with the same system prompt (far below the 4,096-token interval) and another question
    prefills only from the question on, and answers as it would cold."""
    from mtplx.api import prompt_ids

    model, tok = demo_bf16  # the demo's bf16 trunk: a quarter of the 4-bit demo's time
    system = {"role": "system", "content": "You are a careful Python programmer. Answer with code only."}
    one = [system, {"role": "user", "content": "def add(a, b):"}]
    two = [system, {"role": "user", "content": "class Stack:"}]
    kw = dict(max_tokens=4, temperature=0.0, depth=2, enable_thinking=False)
    cache = mtplx.make_prompt_cache(model)
    mtplx.generate(model, tok, one, prompt_cache=cache, **kw)
    prefix = common_prefix(prompt_ids(model, tok, one, False), prompt_ids(model, tok, two, False))
    assert prefix > 10
    hot = list(mtplx.stream_generate(model, tok, two, prompt_cache=cache, **kw))
    assert prefix - 2 <= hot[-1].cached_tokens <= prefix
    assert "".join(r.text for r in hot) == mtplx.generate(model, tok, two, **kw)


def _saved(model, tmp_path, name="c.safetensors"):
    cache = mtplx.make_prompt_cache(model)
    run(model, [5, 3, 5, 8, 9, 7, 9, 3], 2, 6, cache)
    return mtplx.save_prompt_cache(tmp_path / name, cache), cache


def _flip(path, at, n=64):
    data = bytearray(path.read_bytes())
    for i in range(at, at + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_tensor_bytes_are_refused_by_the_checksum(model, tmp_path):
    """Issue 21 row 3: bytes changed inside the tensor data, header intact, loaded silently and
    answered wrong; the sha256 checksum in the metadata refuses them."""
    import struct

    path, _ = _saved(model, tmp_path)
    header = 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]
    size = path.stat().st_size
    for at in (header, header + (size - header) // 2, size - 64):
        damaged = tmp_path / f"damaged-{at}.safetensors"
        damaged.write_bytes(path.read_bytes())
        _flip(damaged, at)
        with pytest.raises(MtplxError, match="damaged .*sha256"):
            mtplx.load_prompt_cache(damaged, model)
    mid = tmp_path / "mid.safetensors"  # 64 bytes mid-file, wherever that lands
    mid.write_bytes(path.read_bytes())
    _flip(mid, size // 2 - 32)
    with pytest.raises(MtplxError, match="damaged|cannot be read"):
        mtplx.load_prompt_cache(mid, model)
    assert mtplx.load_prompt_cache(path, model).tokens  # the intact file still loads


def test_any_file_name_works(model, tmp_path):
    """Issue 21 row 4: `cache.bin` was written, then unreadable ("Unknown file format bin")."""
    for name in ("cache.bin", "cache", "c.safetensors.old"):
        path, cache = _saved(model, tmp_path, name)
        assert path.name == name and path.is_file()
        assert mtplx.load_prompt_cache(path, model).tokens == cache.tokens
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors.old", "cache", "cache.bin"]


@pytest.mark.parametrize("value", [{"a": 1}, "chat.safetensors", 5])
def test_a_prompt_cache_of_the_wrong_type_is_refused(demo, value, tmp_path):
    """Issue 21 row 10: prompt_cache={"a": 1} raised AttributeError from inside the engine."""
    model, tok = demo
    with pytest.raises(MtplxError, match=f"prompt_cache is a {type(value).__name__}, not a PromptCache"):
        mtplx.generate(model, tok, "x", max_tokens=2, prompt_cache=value)
    with pytest.raises(MtplxError, match="not a PromptCache"):
        mtplx.save_prompt_cache(tmp_path / "x.safetensors", value)


def test_an_unwritable_cache_path_is_refused_up_front(model, tmp_path):
    from mtplx.cli.options import check_writable

    with pytest.raises(MtplxError, match="/proc/nope/x: the prompt cache cannot be written there"):
        check_writable("/proc/nope/x", "the prompt cache")
    with pytest.raises(MtplxError, match="the prompt cache path is a directory"):
        check_writable(tmp_path, "the prompt cache")
    assert check_writable(tmp_path / "new" / "c.bin", "the prompt cache") == tmp_path / "new" / "c.bin"
    assert list((tmp_path / "new").iterdir()) == []  # the probe file is gone
    cache = mtplx.make_prompt_cache(model)
    run(model, [1, 2, 3], 0, 2, cache)
    with pytest.raises(MtplxError, match="could not be written"):
        mtplx.save_prompt_cache("/proc/nope/x", cache)
