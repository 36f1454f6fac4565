"""The prompt cache's disk tier (issue 29): a conversation outlives the server.

- engine: a cache written by one LRU and loaded by a fresh one (a restart) continues exactly
  like the live one, counting the reused prefix; the lookup finds a file by its prefix hashes
  without reading it; a file that extends another supersedes it; the bound evicts the least
  recently used file first; a file from another model, a damaged one and one of another format
  are refused with one log line and deleted, and the request starts cold;
- atomicity: two tiers sharing one folder (two servers) write the same conversations at once and
  every file afterwards loads and checks;
- the engine thread never writes: put() only queues copies, which the writer thread writes;
- memory: PromptCache.nbytes equals what the cache holds (mx.get_active_memory), snapshots and
  backlog included, once it is checked in (PromptCache.own);
- server: two real servers in sequence over one folder: the second answers a returning
  conversation from disk, with the text of a cache-less server and cached_tokens (OpenAI) and
  cache_read_input_tokens (Anthropic) counting the reused prefix; `mtplx start`'s chat keeps its
  caches there too; `mtplx serve` refuses contradictory disk options before loading a model.

Every test passes its own tmp folder; none writes to the user's cache directory.
"""

from __future__ import annotations

import gc
import json
import logging
import threading

import mlx.core as mx
import pytest

import mtplx
from mtplx.engine.prompt_cache import PromptCacheLRU, model_identity
from mtplx.engine.prompt_cache_disk import PromptCacheDisk, prefix_hashes
from test_prompt_cache import run
from tiny_models import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(vocab=32, embed_scale=0.12, seed=1)


def tier(model, folder, max_bytes=1 << 30):
    return PromptCacheDisk(folder, model_identity(model), max_bytes)


def lru(model, folder, max_bytes=1 << 30, **kwargs):
    return PromptCacheLRU(model, 1 << 30, disk=tier(model, folder, max_bytes), **kwargs)


def turn(store, model, prompt, depth=2, n=6):
    """One request through ``store`` as the server runs it: checkout, generate, checkin."""
    cache = store.checkout(prompt)
    out, engine = run(model, prompt, depth, n, cache)
    store.checkin(cache)
    store.disk.flush()
    return out, engine, cache


def files(folder):
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


def test_a_restarted_lru_continues_from_disk_like_the_live_cache(model, tmp_path):
    first = lru(model, tmp_path)
    prompt = [5, 3, 5, 8, 9, 7, 9, 3, 1, 2]
    out, _, live = turn(first, model, prompt)
    first.close()
    names = files(tmp_path)
    assert len(names) == 2 and {n.rsplit(".", 1)[1] for n in names} == {"json", "safetensors"}

    follow = prompt + out + [2, 3]
    restarted = lru(model, tmp_path)  # an empty memory tier over the same folder
    loaded = restarted.checkout(follow)
    assert restarted.disk_hits == 1 and loaded.tokens == live.tokens
    assert sorted(loaded.snapshots) == sorted(live.snapshots)
    again, engine = run(model, follow, 3, 8, loaded)
    cold, _ = run(model, follow, 3, 8)
    assert again == cold and engine.stats.cached_tokens == len(live.tokens)
    # A regenerated reply (the same prompt again) resumes from the snapshot before its last token.
    regen = lru(model, tmp_path).checkout(prompt)
    assert regen is not None and regen.reusable(prompt) == len(prompt) - 1
    restarted.close()


def test_the_index_finds_a_file_by_its_prefix_hashes(model, tmp_path):
    store = lru(model, tmp_path, snapshot_interval=4)
    prompt = [7, 1, 7, 2, 7, 3, 7, 4, 7, 5, 7]
    _, _, cache = turn(store, model, prompt)
    entry = json.loads(next(tmp_path.rglob("*.json")).read_text())
    positions = sorted(int(p) for p in entry["prefixes"])
    assert positions == sorted([len(cache.tokens), *cache.snapshots]) and 4 in positions
    assert entry["prefixes"][str(len(cache.tokens))] == next(tmp_path.rglob("*.safetensors")).stem
    disk = tier(model, tmp_path)
    # A prompt that shares 9 tokens: served from the snapshot at 8 (the last position <= 9).
    assert disk.lookup(prompt[:9] + [0, 0])[1] == 8
    assert disk.lookup([0] + prompt) is None
    assert disk.lookup(cache.tokens + [1])[1] == len(cache.tokens)
    assert prefix_hashes([1, 2, 3], [0, 2, 3, 9]) == {0: prefix_hashes([], [0])[0], 2: prefix_hashes([1, 2], [2])[2],
                                                      3: prefix_hashes([1, 2, 3], [3])[3]}
    store.close()
    disk.close()


def test_a_longer_turn_supersedes_its_file(model, tmp_path):
    store = lru(model, tmp_path)
    a = [4, 4, 1, 2, 3]
    out, _, first = turn(store, model, a)
    first_tokens = list(first.tokens)
    turn(store, model, a + out + [6])  # extends a: a's file goes
    assert len(files(tmp_path)) == 2
    assert store.disk.lookup(first_tokens + [0])[1] < len(first_tokens)  # only the longer file's snapshot
    store.close()


def test_the_bound_evicts_the_least_recently_used_file_first(model, tmp_path):
    store = lru(model, tmp_path)
    p1, p2, p3 = [9, 9, 9, 1, 2], [8, 8, 8, 1, 2], [7, 7, 7, 1, 2]
    turn(store, model, p1)
    one = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
    # What else the folder holds is never counted, nor deleted (--prompt-cache-dir ~ must be safe).
    foreign = [tmp_path / "notes.txt", tmp_path / "photos" / "old.safetensors", store.disk.dir / "mine.json"]
    for f in foreign:
        f.parent.mkdir(exist_ok=True)
        f.write_bytes(b"x" * one)
    store.disk.max_bytes = int(one * 2.5)
    turn(store, model, p2)
    assert store.disk.load(p1 + [0], model) is not None  # touches p1's file: p2's is now the oldest
    turn(store, model, p3)
    assert store.disk.evictions == 1 and len(files(tmp_path)) == 4 + len(foreign)
    assert all(f.read_bytes() == b"x" * one for f in foreign)
    assert store.disk.lookup(p2 + [0]) is None
    assert store.disk.lookup(p1 + [0]) is not None and store.disk.lookup(p3 + [0]) is not None
    store.close()


def _one_file(model, folder):
    store = lru(model, folder)
    prompt = [3, 3, 2, 1, 0, 5]
    out, _, _ = turn(store, model, prompt)
    store.close()
    return prompt + out + [1], next(folder.rglob("*.safetensors"))


@pytest.mark.parametrize("damage", ["bytes", "model", "version", "truncated"])
def test_a_refused_file_is_one_log_line_and_a_cold_start(model, tmp_path, caplog, damage):
    follow, path = _one_file(model, tmp_path)
    if damage == "bytes":  # inside the tensor data, the header intact: the checksum catches it
        data = bytearray(path.read_bytes())
        data[-200:-100] = bytes(b ^ 0xFF for b in data[-200:-100])
        path.write_bytes(bytes(data))
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    else:
        arrays, meta = mx.load(str(path), return_metadata=True)
        meta = {**meta, "model": "0" * 64} if damage == "model" else {**meta, "format_version": "1"}
        mx.save_safetensors(str(path.with_suffix("")), arrays, metadata=meta)
    store = lru(model, tmp_path)
    with caplog.at_level(logging.WARNING, logger="mtplx.prompt_cache"):
        cache = store.checkout(follow)
    lines = [r.getMessage() for r in caplog.records if r.name == "mtplx.prompt_cache"]
    assert len(lines) == 1 and "not used" in lines[0] and path.name in lines[0] and "prefills cold" in lines[0]
    reason = {"bytes": "checksum", "model": "another model", "version": "format 1", "truncated": "cannot be read"}
    assert reason[damage] in lines[0], lines[0]
    assert not cache.tokens and store.misses == 1 and store.disk.refused == 1
    assert files(tmp_path) == []  # deleted: the next request does not try it again
    out, engine = run(model, follow, 2, 5, cache)
    assert out == run(model, follow, 2, 5)[0] and engine.stats.cached_tokens == 0
    store.close()


def test_two_tiers_sharing_a_folder_never_leave_a_partial_file(model, tmp_path):
    """Two servers on one folder: both write the same conversations and their own, at once."""
    stores = [lru(model, tmp_path), lru(model, tmp_path)]
    caches = []
    for prompt in ([1, 2, 3, 4, 5], [6, 7, 8, 9, 1], [2, 2, 2, 2, 2]):
        c = mtplx.make_prompt_cache(model)
        run(model, prompt, 1, 4, c)
        c.own()
        caches.append(c)
    errors: list[BaseException] = []

    def write(store):
        try:
            for _ in range(3):
                for c in caches:
                    store.disk.put(c)
                    store.disk.flush()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=write, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert not [n for n in files(tmp_path) if n.startswith(".")], "a temporary file was left"
    assert len(list(tmp_path.rglob("*.safetensors"))) == 3
    for c in caches:
        loaded = stores[1].disk.load(c.tokens + [0], model)
        assert loaded is not None and loaded.tokens == c.tokens
    for s in stores:
        s.close()


def test_put_only_queues_copies_and_the_writer_thread_writes(model, tmp_path, monkeypatch):
    """checkin returns before anything is written, on the writer thread; the file holds the
    cache as it was checked in, though the engine extended it before the write."""
    import mtplx.engine.prompt_cache_disk as disk_module

    writers: list[str] = []
    real = disk_module.write_file

    def spy(*args, **kwargs):
        writers.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(disk_module, "write_file", spy)
    store = lru(model, tmp_path)
    prompt = [1, 5, 1, 5]
    cache = store.checkout(prompt)
    run(model, prompt, 2, 4, cache)
    taken, gate = threading.Event(), threading.Event()
    write = store.disk._write

    def held_write(*args):
        taken.set()
        gate.wait(30)
        write(*args)

    monkeypatch.setattr(store.disk, "_write", held_write)
    store.checkin(cache)
    assert taken.wait(30) and writers == [] and not list(tmp_path.rglob("*.safetensors"))
    at_checkin = list(cache.tokens)
    again = store.checkout(at_checkin + [2, 2])  # the engine goes on with the same cache
    assert again is cache
    run(model, at_checkin + [2, 2], 2, 4, again)
    gate.set()
    store.disk.flush()
    assert writers == ["mtplx-prompt-cache-writer"]
    loaded = tier(model, tmp_path).load(at_checkin + [3], model)
    assert loaded.tokens == at_checkin
    assert run(model, at_checkin + [3], 1, 5, loaded)[0] == run(model, at_checkin + [3], 1, 5)[0]
    store.close()


def wide_model():
    """A small random model whose states are big enough (tens of KB) that the allocator's own
    bookkeeping of tiny arrays does not blur a byte count."""
    from mlx_lm.models.qwen3_5 import Model, ModelArgs, TextModelArgs

    from mtplx.model.mtp_head import MTPHead
    from mtplx.model.mtp_model import MTPModel
    from mtplx.model.trunk import Trunk
    from tiny_models import tiny_text_config

    mx.random.seed(0)
    config = {**tiny_text_config(64), "hidden_size": 128, "head_dim": 64, "linear_key_head_dim": 64,
              "linear_value_head_dim": 64, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
              "max_position_embeddings": 512}
    trunk = Model(ModelArgs(model_type="qwen3_5", text_config=config))
    head = MTPHead(TextModelArgs.from_dict(config))
    mx.eval(trunk.parameters(), head.parameters())
    return MTPModel(Trunk(trunk), head, contract=None)


def test_counted_bytes_are_the_bytes_held():
    """Issue 27: a checked-in cache's nbytes is the memory it keeps alive (what dropping it
    frees), snapshots and backlog included. Before PromptCache.own, the conv states and backlogs
    were slices of the prefill's buffers: the cache held 1.85x what it counted."""
    model = wide_model()
    prompt = [(7 * i) % 64 for i in range(300)]
    run(model, prompt, 2, 4, mtplx.make_prompt_cache(model))  # warm: lazily built model state
    store = PromptCacheLRU(model, 1 << 30)
    cache = store.checkout(prompt)
    cache.snapshot_interval = 64
    run(model, prompt, 2, 6, cache)
    store.checkin(cache)
    assert len(cache.snapshots) >= 4 and len(store) == 1
    counted = store.nbytes
    assert counted == cache.nbytes
    del cache
    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()
    store._entries.clear()  # the only reference: dropping it frees what the cache held
    gc.collect()
    mx.clear_cache()
    freed = before - mx.get_active_memory()
    # Within 5%: the allocator rounds buffers (a full run measured 2.2% off); the bug this
    # catches held 85% more than it counted.
    assert abs(freed - counted) <= 0.05 * counted, (freed, counted)


# -- two real servers in sequence over one folder ------------------------------------------------

GREEDY = {"temperature": 0, "max_tokens": 6}
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


def _openai(s, messages):
    r = s.http.post("/v1/chat/completions", json={"messages": messages, **GREEDY, **NO_THINKING})
    assert r.status_code == 200, r.text
    body = r.json()
    return body["choices"][0]["message"]["content"], body["usage"]["prompt_tokens_details"]["cached_tokens"]


def _anthropic(s, messages):
    r = s.http.post("/v1/messages", json={"model": "demo", "messages": messages, "thinking": {"type": "disabled"},
                                          **GREEDY})
    assert r.status_code == 200, r.text
    body = r.json()
    return "".join(b["text"] for b in body["content"] if b["type"] == "text"), body["usage"]["cache_read_input_tokens"]


def _turns(s, first, second, x_reply=None, y_reply=None):
    """Turn 1 (``first``) or turn 2 (``second``, given turn 1's replies) of two conversations,
    one per dialect."""
    x = [{"role": "user", "content": "def add(a, b):"}]
    y = [{"role": "user", "content": "class Stack:"}]
    if first:
        return _openai(s, x), _anthropic(s, y)
    x2 = x + [{"role": "assistant", "content": x_reply}, {"role": "user", "content": "def sub(a, b):"}]
    y2 = y + [{"role": "assistant", "content": y_reply}, {"role": "user", "content": "class Queue:"}]
    return (_openai(s, x2), _anthropic(s, y2)), (x2, y2)


def test_a_restarted_server_answers_a_returning_conversation_from_disk(demo_bf16, tmp_path, caplog):
    """On the demo's bf16 trunk: a quarter of the 4-bit demo's time on MLX's CPU backend."""
    from mtplx.server.app import create_app
    from server_helpers import running, wait_idle

    model, tok = demo_bf16

    apps = []

    def serve(folder):
        apps.append(create_app(model, tok, served_model_names=["demo"], prompt_cache_bytes=1 << 30,
                               prompt_cache_dir=folder, max_batch=1))
        return running(apps[-1], model, tok)

    with serve(None) as s:  # memory only, never restarted: what a returning turn reuses
        (x1, _), (y1, _) = _turns(s, True, False)
        ((x2_mem, x2_cached_mem), (y2_mem, y2_cached_mem)), (x2, y2) = _turns(s, False, True, x1, y1)
    assert x2_cached_mem >= 14 and y2_cached_mem >= 10  # each first user turn, at least

    with serve(tmp_path) as s:
        assert _turns(s, True, False) == ((x1, 0), (y1, 0))
        wait_idle(s)
    assert len(list(tmp_path.rglob("*.safetensors"))) == 2  # written by the time the server stopped

    with caplog.at_level(logging.WARNING, logger="mtplx.prompt_cache"), serve(tmp_path) as s:
        ((x2_disk, x2_cached), (y2_disk, y2_cached)), _ = _turns(s, False, True, x1, y1)
    assert not [r for r in caplog.records if r.name == "mtplx.prompt_cache"]
    kw = dict(max_tokens=6, temperature=0, enable_thinking=False)
    assert x2_disk == x2_mem == mtplx.generate(model, tok, x2, **kw)
    assert y2_disk == y2_mem == mtplx.generate(model, tok, y2, **kw)
    assert (x2_cached, y2_cached) == (x2_cached_mem, y2_cached_mem)
    assert apps[-1].state.core.prompt_caches.disk_hits == 2


def test_the_chat_keeps_its_caches_on_disk(demo_bf16, tmp_path):
    """`mtplx start`'s chat writes each turn's cache to its folder; a later chat that starts as
    this one did loads it, and answers as the first did (on the demo's bf16 copy)."""
    from mtplx.cli.chat import ChatSession, run_chat

    model, tok = demo_bf16
    chats = []
    for _ in range(2):
        s = ChatSession(model, tok, depth=0, thinking=False, max_tokens=4, temperature=0.0, prompt_cache_dir=tmp_path)
        script = ["def add(a, b):", "/quit"]
        run_chat(s, read=lambda _prompt: script.pop(0))
        chats.append(s)
        assert len(list(tmp_path.rglob("*.safetensors"))) == 1  # the turn's cache, written when the chat ended
    first, second = chats
    assert first.prompt_caches.disk_hits == 0 and second.prompt_caches.disk_hits == 1
    assert second.messages == first.messages


@pytest.mark.parametrize("args, needle", [
    (["--no-prompt-cache", "--prompt-cache-dir", "{tmp}"], "turns them off: drop --prompt-cache-dir"),
    (["--prompt-cache-gb", "0", "--prompt-cache-disk-gb", "2"], "turns them off: drop --prompt-cache-dir"),
    (["--prompt-cache-dir", "{tmp}/file/sub"], "the prompt cache folder cannot be created"),
])
def test_serve_refuses_disk_options_before_loading(tmp_path, args, needle):
    from click.testing import CliRunner

    from mtplx.cli.commands import cli

    (tmp_path / "file").write_text("not a folder")
    r = CliRunner().invoke(cli, ["serve", "--model", "demo", "--port", "1"] +
                           [a.replace("{tmp}", str(tmp_path)) for a in args])
    assert r.exit_code != 0 and needle in r.output, r.output
    assert "Traceback" not in r.output
