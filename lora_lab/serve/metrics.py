"""GET /metrics: the server in Prometheus' text format, through prometheus_client (the `serve` extra).

    lora_lab_requests_total{model, status}              HTTP requests answered, by model (the base's or an adapter's
                                                         name; "none" for routes without one) and status code
    lora_lab_queue_length                               requests waiting for a row of the batch
    lora_lab_running_rows                               requests being decoded (rows of the KV cache in use)
    lora_lab_generated_tokens_total                     tokens sampled
    lora_lab_time_to_first_token_seconds                histogram: arrival -> first token
    lora_lab_time_per_output_token_seconds              histogram: each token after a request's first, the time since
                                                         its previous one
    lora_lab_request_duration_seconds{finish_reason}    histogram: arrival -> last event
    lora_lab_adapters_loaded_total, _evicted_total      adapters read into a slot / dropped from one
    lora_lab_adapters_in_memory                         adapters in slots now

Each app has its own registry (not prometheus_client's global one), so several servers in one process (the tests)
do not mix. The gauges and the engine's counters are read when scraped (a custom collector), the histograms are
filled by engine listeners, as tokens come and as requests finish.
"""

from __future__ import annotations

from fastapi import APIRouter, Request as HTTPRequest
from fastapi.responses import Response

from lora_lab.serve.errors import APIError

router = APIRouter()

TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    def __init__(self, server) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.server = server
        self.registry = CollectorRegistry()
        self.requests = Counter("lora_lab_requests", "HTTP requests answered", ["model", "status"],
                                registry=self.registry)
        self.ttft = Histogram("lora_lab_time_to_first_token_seconds", "arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram("lora_lab_time_per_output_token_seconds", "time from a token to the request's next",
                              buckets=TOKEN_BUCKETS, registry=self.registry)
        self.duration = Histogram("lora_lab_request_duration_seconds", "arrival to the last event",
                                  ["finish_reason"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(server))
        server.engine.listeners.append(self.observe)
        server.engine.gap_listeners.append(self.observe_gaps)

    def observe_gaps(self, gaps: list[float]) -> None:
        """An engine listener: one decode step's time since each row's previous token."""
        for gap in gaps:
            self.tpot.observe(gap)

    def observe(self, req) -> None:
        """An engine listener: a request finished (called from the engine thread)."""
        if req.first_token_time is not None:
            self.ttft.observe(req.first_token_time - req.submit_time)
        self.duration.labels(req.finish_reason).observe(req.finish_time - req.submit_time)

    def count(self, model: str, status: int) -> None:
        self.requests.labels(model, str(status)).inc()

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class _EngineCollector:
    """Read the engine's and the adapter store's state when scraped."""

    def __init__(self, server) -> None:
        self.server = server

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        engine, store = self.server.engine, self.server.store
        yield GaugeMetricFamily("lora_lab_queue_length", "requests waiting for a row", value=len(engine.waiting))
        yield GaugeMetricFamily("lora_lab_running_rows", "requests being decoded", value=len(engine.rows))
        yield CounterMetricFamily("lora_lab_generated_tokens", "tokens sampled", value=engine.tokens_generated)
        yield CounterMetricFamily("lora_lab_adapters_loaded", "adapters read into a slot", value=store.loads)
        yield CounterMetricFamily("lora_lab_adapters_evicted", "adapters dropped from a slot", value=store.evictions)
        yield GaugeMetricFamily("lora_lab_adapters_in_memory", "adapters in slots", value=len(store.loaded))


def make_metrics(server):
    """Metrics for `server`, or None without prometheus_client (then /metrics says how to get it)."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return None
    return Metrics(server)


@router.get("/metrics")
async def metrics(http: HTTPRequest):
    m = http.app.state.metrics
    if m is None:
        raise APIError(404, "/metrics needs prometheus_client: pip install -e '.[serve]'", code="not_available")
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(m.text(), media_type=CONTENT_TYPE_LATEST)
