"""OpenAI- and Anthropic-compatible HTTP server (`mtplx serve`).

* :mod:`mtplx.server.app` - ``create_app(model, tokenizer, ...)``: assembles the pieces below.
* :mod:`mtplx.server.core` - the request core every dialect shares: errors, prompt encoding,
  the queue and the engine, usage.
* :mod:`mtplx.server.openai` - OpenAI's chat and completions routes.
* :mod:`mtplx.server.queue` - the bounded queue and the single worker thread that owns the model.
* :mod:`mtplx.server.metrics` - counters for ``GET /metrics`` (Prometheus text format).
"""
