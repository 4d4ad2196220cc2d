"""Prometheus metrics of one app, in its own registry (no process-global state: two apps in one
process, as in the tests, count apart)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector
from prometheus_client.exposition import choose_encoder

PREFIX = "padim_serve"
# from a cached small model on a fast core to a large batch queued behind other clients on a slow one
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServeMetrics:
    """The service's counters, latency histogram and model info, rendered by :meth:`render`."""

    def __init__(self, model_info: dict[str, str]):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "HTTP requests answered, by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram(f"{PREFIX}_request_duration_seconds", "Time from request to response, by route",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_progress = Gauge(f"{PREFIX}_requests_in_progress", "Requests being answered now", registry=r)
        self.images = Counter(f"{PREFIX}_images_scored", "Images scored by the model", registry=r)
        self.anomalies = Counter(f"{PREFIX}_anomalies_flagged",
                                 "Images scored above the model's threshold (labelled 'anomaly')", registry=r)
        self.model = Info(f"{PREFIX}_model", "The served model: id, format, threshold, image size", registry=r)
        self.model.info(model_info)
        ProcessCollector(registry=r)  # memory, CPU seconds, open files of this process (Linux)

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one answered request and its latency."""
        self.requests.labels(route=route, method=method, status=str(status)).inc()
        self.latency.labels(route=route).observe(seconds)

    def scored(self, labels: list[str | None]) -> None:
        """Count scored images and the ones flagged as anomalies."""
        self.images.inc(len(labels))
        self.anomalies.inc(sum(label == "anomaly" for label in labels))

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """(body, content type): the Prometheus text format, or OpenMetrics when ``accept`` asks for it."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
