"""kv_bits: the trunk's attention KV stored quantized (mtplx/model/kv_quant.py).

Exactness is relative to AR with the same kv_bits:
- greedy MTP at depths 1-3 equals greedy AR (mlx-lm's own forward over its QuantizedKVCache) on
  the demo's head over a bf16 trunk (a quarter of the 4-bit demo's time), token for token;
- after steps with rejections every cache equals an AR pass over the committed tokens (the
  quantized rows compared as stored: packed data, scales and biases);
- batched rows (with kv_bits 8, 4 and None side by side) equal their solo runs;
- prompt caches (memory, a file, the disk tier) continue like the live cache with kv_bits and
  are refused across kv_bits;
- a bad kv_bits / kv_group_size is one clear error, in the API and on the CLI.
(The law at kv_bits=8 is tests/test_engine_law.py's depth-2 case.)
"""

from __future__ import annotations

import mlx.core as mx
import pytest
from click.testing import CliRunner
from mlx_lm.models.cache import KVCache, QuantizedKVCache

import mtplx
from cache_compare import compare
from mtplx.engine.batch import BatchDecoder, RowRequest
from mtplx.engine.prompt_cache import PromptCacheLRU, cache_identity, model_identity
from mtplx.engine.prompt_cache_disk import PromptCacheDisk
from mtplx.engine.reference import ar_generate
from mtplx.engine.sampling import SamplingParams
from mtplx.engine.speculative import Engine
from mtplx.errors import MtplxError
from mtplx.model import kv_quant
from tiny_models import tiny_model

GREEDY = SamplingParams(temperature=0.0)
SAMPLED = SamplingParams(temperature=0.8, top_k=8, top_p=0.95)
PROMPT = [3, 1, 4, 1, 5]
TOKENS = 16  # greedy on the demo: each depth's run on a loaded 2-core machine costs seconds


@pytest.fixture(scope="module")
def model():
    """A random float32 model whose attention heads (32) kv_bits' groups divide."""
    return tiny_model(vocab=32, embed_scale=0.12, seed=1, head_dim=32)


def run(model, prompt, depth, n, kv_bits, cache=None, params=SAMPLED, seed=0):
    engine = Engine(model, depth, params, seed=seed, kv_bits=kv_bits, kv_group_size=32)
    return [t for step in engine.generate(prompt, n, prompt_cache=cache) for t in step.tokens], engine


def test_greedy_mtp_equals_greedy_ar_with_the_same_kv_bits(demo_bf16):
    model, tok = demo_bf16
    ids = tok.encode("import os\nimport sys\n\n\ndef main(argv):\n")
    ar = [t for s in ar_generate(model, ids, TOKENS, GREEDY, kv_bits=8) for t in s.tokens]
    assert len(ar) == TOKENS
    for depth in (1, 2, 3):
        engine = Engine(model, depth, GREEDY, kv_bits=8)
        mtp = [t for s in engine.generate(ids, TOKENS) for t in s.tokens]
        assert mtp == ar, f"depth {depth}"
        assert engine.stats.steps < TOKENS, "no draft was accepted: nothing was tested"
        attention = [c for c in engine.cache.trunk if not hasattr(c, "pending_len")]
        assert attention and all(isinstance(c, QuantizedKVCache) and c.bits == 8 for c in attention)
        assert all(isinstance(c, KVCache) for c in engine.cache.head)  # the head's stays full precision
    # Not a vacuous check: the quantized target's logits are not the full-precision ones.
    logits = [model.trunk.logits(mx.array([ids]), model.trunk.make_cache(bits, 64)) for bits in (None, 8)]
    assert float(mx.abs(logits[0] - logits[1]).max().item()) > 0, "kv_bits=8 changed nothing"


@pytest.mark.parametrize("kv_bits,depth", [(8, 3), (4, 2)])
def test_caches_equal_ar_after_rejections(model, kv_bits, depth):
    emitted, rejected = [], 0
    engine = Engine(model, depth, SAMPLED, seed=depth, kv_bits=kv_bits, kv_group_size=32)
    for i, step in enumerate(engine.generate(PROMPT, 20)):
        emitted += step.tokens
        if i == 0:
            continue
        rejected += step.accepted < step.drafted
        assert engine.cache.offset == len(PROMPT) + len(emitted) - 1
        # compare() builds its AR reference with the cache's own bits and group size.
        compare(model, engine.cache, PROMPT + emitted[:-1], atol=1e-9)
    assert rejected > 0, "no rejection happened: the rollback path was not exercised"
    assert isinstance(engine.cache.trunk[1], QuantizedKVCache) and engine.cache.trunk[1].bits == kv_bits


def test_batched_rows_equal_their_solo_runs(model):
    kinds = [(8, 3, 11), (4, 2, 12), (None, 2, 13), (8, 0, 14)]  # (kv_bits, depth, seed): rows may differ
    prompts = [PROMPT, [2, 7, 1, 8, 2, 8], [9, 9], [6, 5, 4, 3, 2, 1, 0]]
    decoder = BatchDecoder(model, max_batch=4)
    rows = [decoder.add(RowRequest(p, 12, SAMPLED, depth=d, seed=s, kv_bits=kv, kv_group_size=32))
            for p, (kv, d, s) in zip(prompts, kinds)]
    while len(decoder):
        decoder.step()
    for row, p, (kv, d, s) in zip(rows, prompts, kinds):
        solo, _ = run(model, p, d, 12, kv, seed=s)
        assert row.emitted == solo, f"kv_bits={kv} depth {d}"


def test_prompt_cache_continues_like_cold_and_is_refused_across_kv_bits(model, tmp_path):
    cache = mtplx.make_prompt_cache(model, kv_bits=8, kv_group_size=32)
    history = [3, 1, 4, 1, 5, 9, 2, 6]
    for turn, depth in enumerate((2, 0, 3)):
        cold, _ = run(model, history, depth, 8, 8)
        hot, engine = run(model, history, depth, 8, 8, cache)
        assert hot == cold, f"turn {turn}"
        assert engine.stats.cached_tokens > 0 or turn == 0
        compare(model, cache.cache, cache.tokens, atol=1e-9)
        history = history + hot + [7, 7]
    full = mtplx.make_prompt_cache(model)
    run(model, cache.tokens + [1], 0, 1, None, full)
    kv_bytes = [sum(kv_quant.nbytes(c) for c in pc.cache.trunk if kv_quant.is_kv(c)) for pc in (cache, full)]
    assert kv_bytes[0] < 0.35 * kv_bytes[1]  # 8 bits + a float32 scale and bias per 32, not 32 bits
    # A copy of a prefix keeps the quantization.
    part = cache.copy_prefix(max(cache.snapshots))
    assert isinstance(part.cache.trunk[1], QuantizedKVCache) and part.kv_bits == 8
    with pytest.raises(MtplxError, match="kv_bits=8.*kv_bits=None"):
        run(model, history, 2, 4, None, cache)
    with pytest.raises(MtplxError, match="kv_bits"):
        mtplx.generate(model, _Tok(), history, max_tokens=2, prompt_cache=cache, kv_bits=4, kv_group_size=32)

    # A file: it continues like the live cache, and is refused for another kv_bits.
    path = mtplx.save_prompt_cache(tmp_path / "c.safetensors", cache)
    loaded = mtplx.load_prompt_cache(path, model, kv_bits=8, kv_group_size=32)
    assert loaded.tokens == cache.tokens and loaded.kv_bits == 8
    follow = cache.tokens + [2, 3]
    live, _ = run(model, follow, 3, 6, 8, cache)
    again, e2 = run(model, follow, 3, 6, 8, loaded)
    assert live == again and e2.stats.cached_tokens > 0
    for bits, group in ((None, 64), (4, 32), (8, 64)):
        with pytest.raises(MtplxError, match="written with kv_bits=8 .group size 32.*--kv-bits 8"):
            mtplx.load_prompt_cache(path, model, kv_bits=bits, kv_group_size=group)
    with pytest.raises(MtplxError, match="another model"):
        mtplx.load_prompt_cache(path, tiny_model(vocab=16, seed=3, head_dim=32), kv_bits=8, kv_group_size=32)


def test_the_disk_tier_keeps_each_kv_setting_apart(model, tmp_path):
    def store(bits):
        disk = PromptCacheDisk(tmp_path, cache_identity(model, bits, 32), 1 << 30, kv_bits=bits, kv_group_size=32)
        return PromptCacheLRU(model, 1 << 30, disk=disk, kv_bits=bits, kv_group_size=32)

    assert cache_identity(model, None, 32) == model_identity(model)  # unquantized files stay valid
    first = store(8)
    prompt = [5, 3, 5, 8, 9, 7, 9, 3, 1, 2]
    cache = first.checkout(prompt)
    out, _ = run(model, prompt, 2, 6, 8, cache)
    first.checkin(cache)
    first.close()
    follow = prompt + out + [2, 3]
    other = store(None).checkout(follow)  # another folder: nothing to load, a cold cache of its own kind
    assert not other.tokens and other.kv_bits is None
    restarted = store(8)
    loaded = restarted.checkout(follow)
    assert restarted.disk_hits == 1 and loaded.tokens == cache.tokens and loaded.kv_bits == 8
    again, _ = run(model, follow, 3, 6, 8, loaded)
    cold, _ = run(model, follow, 3, 6, 8)
    assert again == cold
    restarted.close()


def test_the_server_decodes_every_request_with_its_kv_bits(demo_bf16, tmp_path):
    """serve --kv-bits 8 (on the demo's bf16 copy): answers equal mtplx.generate(kv_bits=8), and
    the prompt caches (memory and the disk folder of that setting) hold 8-bit KV."""
    from mtplx.server.app import create_app
    from server_helpers import running, wait_idle

    model, tok = demo_bf16
    app = create_app(model, tok, served_model_names=["demo"], prompt_cache_bytes=1 << 30, prompt_cache_dir=tmp_path,
                     kv_bits=8)
    messages = [{"role": "user", "content": "def add(a, b):"}]
    with running(app, model, tok) as s:
        r = s.http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 6, "temperature": 0,
                                                      "chat_template_kwargs": {"enable_thinking": False}})
        assert r.status_code == 200, r.text
        wait_idle(s)
        lru = app.state.core.prompt_caches
        assert lru.disk.dir.name == cache_identity(model, 8, 64)[:16]
        held = [entry for entry, _ in lru._entries.values()]
        assert held and all(isinstance(c, QuantizedKVCache) for e in held for c in e.cache.trunk if kv_quant.is_kv(c))
    want = mtplx.generate(model, tok, messages, max_tokens=6, temperature=0, enable_thinking=False, kv_bits=8)
    assert r.json()["choices"][0]["message"]["content"] == want


class _Tok:
    eos_token_ids: list[int] = []


@pytest.mark.parametrize("kwargs,needle", [
    ({"kv_bits": 3}, "kv_bits must be None, 8 or 4, got 3"),
    ({"kv_bits": "8"}, "kv_bits must be None, 8 or 4"),
    ({"kv_bits": True}, "kv_bits must be None, 8 or 4"),
    ({"kv_bits": 8, "kv_group_size": 48}, "kv_group_size must be 32, 64 or 128, got 48"),
    ({"kv_bits": 8, "kv_group_size": 64}, "kv_group_size 64 does not divide this model's attention head size .32."),
])
def test_bad_kv_settings_are_one_clear_error(model, kwargs, needle):
    for call in (lambda: Engine(model, 2, SAMPLED, **kwargs),
                 lambda: mtplx.generate(model, _Tok(), [1, 2, 3], max_tokens=2, **kwargs),
                 lambda: mtplx.make_prompt_cache(model, **kwargs).cache):
        with pytest.raises(MtplxError, match=needle) as info:
            call()
        assert "Fix:" in str(info.value) and info.value.param in ("kv_bits", "kv_group_size")


def test_a_pipeline_stage_refuses_kv_bits(model):
    """A distributed run's other ranks make their own caches, full precision: refused, not mixed."""
    model.trunk.stage = object()  # any stage: the check reads only that there is one
    try:
        with pytest.raises(MtplxError, match="kv_bits is not supported in a distributed run"):
            Engine(model, 0, SAMPLED, kv_bits=8, kv_group_size=32)
        assert model.trunk.check_kv(None, 32) == (None, 32)
    finally:
        model.trunk.stage = None


def test_start_passes_kv_bits_to_the_server(tmp_path, monkeypatch):
    import click

    import mtplx.cli.serve_cmd as serve_cmd
    from test_launcher import _cli_start

    seen = {}

    @click.command("serve")
    @click.option("--model", "model_ref")
    @click.option("--depth", default=None)
    @click.option("--no-mtp", is_flag=True)
    @click.option("--kv-bits", type=int, default=None)
    @click.option("--kv-group-size", type=int, default=64)
    def fake_serve(**kwargs):
        seen.update(kwargs)

    monkeypatch.setattr(serve_cmd, "serve", fake_serve)
    r = _cli_start(["--model", "demo", "--surface", "serve", "--depth", "0", "--kv-bits", "4", "--kv-group-size", "32"],
                   "", tmp_path)
    assert r.exit_code == 0, r.output
    assert seen["kv_bits"] == 4 and seen["kv_group_size"] == 32


@pytest.mark.parametrize("command", ["run", "serve", "bench", "start"])
def test_cli_refuses_a_bad_kv_bits_as_a_usage_error(command):
    from mtplx.cli.commands import cli

    result = CliRunner().invoke(cli, [command, "--kv-bits", "3", *(["hi"] if command == "run" else [])])
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--kv-bits': '3' is not one of 'none', '8', '4'" in result.output
    assert "Traceback" not in result.output
