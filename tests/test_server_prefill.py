"""`mtplx serve --prefill-chunk`: the server's decoder feeds a joining prompt in chunks of that size,
and the answer is the one `mtplx.generate` gives (chunking changes no token on MLX's CPU backend)."""

from __future__ import annotations

from server_helpers import running

import mtplx
from mtplx.server.app import create_app


def test_a_small_prefill_chunk_answers_as_generate(demo_bf16) -> None:
    model, tokenizer = demo_bf16  # the demo's bf16 trunk: a quarter of the 4-bit demo's time
    prompt = "import os\nimport sys\n" * 20  # well over one 16-token chunk
    app = create_app(model, tokenizer, served_model_names=["demo"], prefill_chunk=16, prompt_cache_bytes=0)
    with running(app, model, tokenizer) as s:
        r = s.http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4, "temperature": 0}).json()
        assert app.state.core.scheduler.prefill_chunk == 16
    assert r["choices"][0]["text"] == mtplx.generate(model, tokenizer, prompt, max_tokens=4, temperature=0)


def test_a_bad_prefill_chunk_is_refused(demo) -> None:
    import pytest

    from mtplx.errors import MtplxError

    with pytest.raises(MtplxError, match="prefill_chunk"):
        create_app(*demo, prefill_chunk=0)
