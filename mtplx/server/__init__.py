"""OpenAI-compatible HTTP server (`mtplx serve`).

* :mod:`mtplx.server.app` - ``create_app(model, tokenizer, ...)``: the FastAPI app (request
  models, OpenAI-shaped responses and errors, server-sent-event streaming).
* :mod:`mtplx.server.queue` - the bounded queue and the single worker thread that owns the model.
* :mod:`mtplx.server.metrics` - counters for ``GET /metrics`` (Prometheus text format).
"""
