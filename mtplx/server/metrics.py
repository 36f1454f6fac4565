"""Server counters, rendered in the Prometheus text exposition format (version 0.0.4).

Written by hand rather than with prometheus_client: the handful of series below do not justify
a dependency, and the worker thread and the event loop both update them, so one lock guards
everything and a scrape sees a consistent snapshot.
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from typing import Any, Callable

from mtplx.engine.stats import AcceptanceTally

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Endpoints get their own label value; anything else is "other" so that a scanner probing
# random paths cannot grow the number of series without bound.
KNOWN_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/messages/count_tokens",
                   "/v1/models", "/health", "/metrics")


# Histogram buckets: rows per engine step, and a finished row's decode tokens/s.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
ROW_TPS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500)


class Histogram:
    """A Prometheus histogram: cumulative bucket counts, sum and count."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def samples(self) -> list[tuple[str, str, float]]:
        """(suffix, labels, value) rows of the exposition format."""
        rows = [("_bucket", f'{{le="{_fmt(b)}"}}', n) for b, n in zip(self.buckets, self.counts)]
        rows.append(("_bucket", '{le="+Inf"}', self.count))
        return rows + [("_sum", "", self.sum), ("_count", "", self.count)]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt(value: float) -> str:
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Metrics:
    """Everything /metrics reports. ``queue_depth`` and ``busy`` are read live from callables
    (the scheduler owns that state) so they can never drift from the truth."""

    def __init__(self, queue_depth: Callable[[], int] = lambda: 0, busy: Callable[[], bool] = lambda: False,
                 running: Callable[[], int] = lambda: 0):
        self._lock = threading.Lock()
        self._queue_depth = queue_depth
        self._busy = busy
        self._running = running
        self.batch_sizes = Histogram(BATCH_BUCKETS)  # rows in each engine step
        self.row_tps = Histogram(ROW_TPS_BUCKETS)  # each finished row's own decode tokens/s
        self.requests: dict[tuple[str, str], int] = defaultdict(int)
        self.generations: dict[str, int] = defaultdict(int)
        self.prompt_tokens = 0
        self.cached_prompt_tokens = 0
        self.generated_tokens = 0
        self.decode_seconds = 0.0
        self.last_tps = 0.0
        self.last_tokens_per_step = 0.0
        # Summed over every generation, so the acceptance gauge is the server-lifetime rate
        # P(draft k accepted), not the noisy value of the last request.
        self.acceptance = AcceptanceTally()
        # Decode steps by the depth they drafted (depth auto's mix; a pinned depth fills one).
        self.depth_steps: dict[int, int] = defaultdict(int)
        # Emitted tokens by where they came from: copied drafts, MTP drafts, sampled.
        self.tokens_from: dict[str, int] = defaultdict(int)

        # The prompt-cache LRU, read live at each scrape (None: the server runs without one).
        self.prompt_caches: Any = None

    def bind(self, queue_depth: Callable[[], int], busy: Callable[[], bool],
             running: Callable[[], int] = lambda: 0) -> None:
        self._queue_depth, self._busy, self._running = queue_depth, busy, running

    def record_batch(self, rows: int) -> None:
        """One engine step over ``rows`` rows."""
        with self._lock:
            self.batch_sizes.observe(rows)

    def record_request(self, path: str, status: int) -> None:
        if path in KNOWN_ENDPOINTS:
            endpoint = path
        elif path.startswith("/v1/models/"):
            endpoint = "/v1/models/{name}"
        else:
            endpoint = "other"
        with self._lock:
            self.requests[(endpoint, str(status))] += 1

    def record_generation(self, outcome: str, stats: Any | None = None) -> None:
        """``outcome``: completed, cancelled (client left mid-generation), dropped (left while
        queued, never ran) or error. ``stats`` is the engine's DecodeStats when it ran."""
        with self._lock:
            self.generations[outcome] += 1
            if stats is None:
                return
            self.prompt_tokens += stats.prompt_tokens
            self.cached_prompt_tokens += stats.cached_tokens
            self.generated_tokens += stats.generated
            self.decode_seconds += stats.decode_seconds
            if stats.generated:
                self.last_tps = stats.tokens_per_second
                self.last_tokens_per_step = stats.tokens_per_step
                self.row_tps.observe(stats.tokens_per_second)
            self.acceptance.add(stats)
            for d, n in enumerate(getattr(stats, "depth_steps", ())):
                self.depth_steps[d] += n
            for source in ("lookup", "mtp", "sampled"):
                self.tokens_from[source] += getattr(stats, f"from_{source}", 0)

    def render(self) -> str:
        with self._lock:
            lines: list[str] = []

            def family(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
                lines.append(f"# HELP {name} {help_text}")
                lines.append(f"# TYPE {name} {kind}")
                lines.extend(f"{name}{labels} {_fmt(v)}" for labels, v in samples)

            family("mtplx_requests_total", "counter", "HTTP requests by endpoint and status code.",
                   [(f'{{endpoint="{_escape(e)}",status="{s}"}}', n) for (e, s), n in sorted(self.requests.items())])
            family("mtplx_generations_total", "counter",
                   "Generations by outcome (completed, cancelled, dropped, error).",
                   [(f'{{outcome="{o}"}}', n) for o, n in sorted(self.generations.items())])
            family("mtplx_prompt_tokens_total", "counter", "Prompt tokens of all generations (cached ones included).",
                   [("", self.prompt_tokens)])
            family("mtplx_cached_prompt_tokens_total", "counter", "Prompt tokens a prompt cache served (not prefilled).",
                   [("", self.cached_prompt_tokens)])
            lru = self.prompt_caches
            if lru is not None:
                family("mtplx_prompt_cache_hits_total", "counter", "Requests that reused a cached prefix.",
                       [("", lru.hits)])
                family("mtplx_prompt_cache_misses_total", "counter", "Requests that found no cached prefix.",
                       [("", lru.misses)])
                family("mtplx_prompt_cache_evictions_total", "counter", "Prompt caches dropped to stay in the bound.",
                       [("", lru.evictions)])
                family("mtplx_prompt_cache_bytes", "gauge", "Bytes the prompt caches hold.", [("", lru.nbytes)])
                family("mtplx_prompt_cache_limit_bytes", "gauge", "The bound on those bytes (--prompt-cache-gb).",
                       [("", lru.max_bytes)])
                family("mtplx_prompt_cache_entries", "gauge", "Conversations cached.", [("", len(lru))])
            family("mtplx_generated_tokens_total", "counter", "Tokens generated.", [("", self.generated_tokens)])
            family("mtplx_last_tokens_per_second", "gauge", "Decode throughput of the last generation.",
                   [("", self.last_tps)])
            avg = self.generated_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0
            family("mtplx_average_tokens_per_second", "gauge",
                   "Decode throughput over all generations (generated tokens / decode seconds).", [("", avg)])
            family("mtplx_last_tokens_per_step", "gauge", "Tokens per engine step in the last generation.",
                   [("", self.last_tokens_per_step)])
            family("mtplx_acceptance", "gauge",
                   "Acceptance rate of the draft at each position, over all generations.",
                   [(f'{{position="{k + 1}"}}', rate) for k, rate in enumerate(self.acceptance.rates)])
            family("mtplx_steps_by_depth_total", "counter",
                   "Decode steps by the number of tokens they drafted (0 = a plain step), over all generations.",
                   [(f'{{depth="{d}"}}', n) for d, n in sorted(self.depth_steps.items())])
            family("mtplx_generated_tokens_by_source_total", "counter",
                   "Generated tokens by where they came from: lookup (accepted drafts copied from the context), "
                   "mtp (accepted MTP drafts), sampled (sampled from the trunk: first, residual and bonus tokens).",
                   [(f'{{source="{k}"}}', self.tokens_from[k]) for k in ("lookup", "mtp", "sampled")])
            family("mtplx_queue_depth", "gauge", "Requests waiting for the engine.", [("", self._queue_depth())])
            family("mtplx_busy", "gauge", "1 while a generation is running.", [("", int(self._busy()))])
            family("mtplx_batch_size", "gauge", "Rows decoding together now (--max-batch bounds it).",
                   [("", self._running())])

            def histogram(name: str, help_text: str, h: Histogram) -> None:
                lines.append(f"# HELP {name} {help_text}")
                lines.append(f"# TYPE {name} histogram")
                lines.extend(f"{name}{suffix}{labels} {_fmt(v)}" for suffix, labels, v in h.samples())

            histogram("mtplx_batch_size_rows", "Rows in each engine step.", self.batch_sizes)
            histogram("mtplx_row_tokens_per_second",
                      "Each finished generation's own decode throughput (tokens/s while it was in the batch).",
                      self.row_tps)
            return "\n".join(lines) + "\n"


class MetricsMiddleware:
    """Counts every HTTP response by endpoint and status. Pure ASGI so that a streamed
    response is counted when its status line goes out, not when the stream ends."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = False

        async def counting_send(message: dict) -> None:
            nonlocal sent
            if message["type"] == "http.response.start" and not sent:
                sent = True
                self.metrics.record_request(scope.get("path", ""), message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except asyncio.CancelledError:
            # The client went away before a response started: nginx's "client closed request".
            if not sent:
                self.metrics.record_request(scope.get("path", ""), 499)
            raise
        except Exception:
            # The outer ServerErrorMiddleware turns this into a 500; count it as one.
            if not sent:
                self.metrics.record_request(scope.get("path", ""), 500)
            raise
