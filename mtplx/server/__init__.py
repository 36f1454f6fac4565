"""OpenAI- and Anthropic-compatible HTTP server (`mtplx serve`).

* :mod:`mtplx.server.app` - ``create_app(model, tokenizer, ...)``: assembles the pieces below.
* :mod:`mtplx.server.core` - the request core every dialect shares (and none knows): prompt
  encoding, response_format compiling, the queue and the engine.
* :mod:`mtplx.server.http_errors` - the error type, its OpenAI and Anthropic shapes, and which
  exceptions are the client's fault (400) or the server's (logged, 500).
* :mod:`mtplx.server.openai` - OpenAI's chat and completions routes; their request bodies in
  :mod:`mtplx.server.openai_requests`.
* :mod:`mtplx.server.anthropic` - Anthropic's Messages routes, on the same core; their request
  bodies in :mod:`mtplx.server.anthropic_requests`.
* :mod:`mtplx.server.tools` - tool calls found in the model's text and parsed (mlx-lm's parsers),
  and the tool refusals both dialects share.
* :mod:`mtplx.server.guards` - Host header check, request body limit and JSON nesting limit.
* :mod:`mtplx.server.http` - uvicorn's h11 protocol with deadlines for a request to arrive.
* :mod:`mtplx.server.queue` - the bounded queue and the single worker thread that owns the model.
* :mod:`mtplx.server.metrics` - counters for ``GET /metrics`` (Prometheus text format).
"""
