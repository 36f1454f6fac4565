"""OpenAI- and Anthropic-compatible HTTP server (`mtplx serve`).

* :mod:`mtplx.server.app` - ``create_app(model, tokenizer, ...)``: assembles the pieces below.
* :mod:`mtplx.server.core` - the request core every dialect shares: errors, prompt encoding,
  the queue and the engine, usage.
* :mod:`mtplx.server.openai` - OpenAI's chat and completions routes.
* :mod:`mtplx.server.anthropic` - Anthropic's Messages routes, on the same core.
* :mod:`mtplx.server.tools` - tool calls found in the model's text and parsed (mlx-lm's parsers).
* :mod:`mtplx.server.guards` - Host header check and request body limit.
* :mod:`mtplx.server.queue` - the bounded queue and the single worker thread that owns the model.
* :mod:`mtplx.server.metrics` - counters for ``GET /metrics`` (Prometheus text format).
"""
