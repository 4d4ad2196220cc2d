"""Prometheus metrics of one app, in its own registry (no process-global state: two apps in one
process, as in the tests, count apart)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric

from .. import __version__

if TYPE_CHECKING:
    from .inspector import Inspector
    from .reload import ModelSlot
    from .window import ScoreWindow

PREFIX = "padim_serve"
# from a cached small model on a fast core to a large batch queued behind other clients on a slow one
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def model_labels(inspector: Inspector) -> dict[str, str]:
    """The labels of ``padim_serve_model_info``."""
    h, w = inspector.image_size
    threshold = inspector.threshold
    return {"model_id": inspector.model_id, "format": inspector.format,
            "threshold": "none" if threshold is None else repr(float(threshold)),
            "image_size": f"{h}x{w}", "server_version": __version__}


class ServeMetrics:
    """The service's counters, latency histogram, the served model and the recent window, rendered by
    :meth:`render`. The model and window values are read from ``slot`` and ``window`` at each scrape."""

    def __init__(self, slot: ModelSlot, window: ScoreWindow):
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
        r.register(_Live(slot, window))
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


class _Live:
    """The values read at scrape time: the served model, its reloads, and the recent window."""

    def __init__(self, slot: ModelSlot, window: ScoreWindow):
        self.slot, self.window = slot, window

    def collect(self) -> Iterator[Metric]:
        loaded = self.slot.loaded
        yield InfoMetricFamily(f"{PREFIX}_model", "The served model: id, format, threshold, image size",
                               value=model_labels(loaded.inspector))
        yield GaugeMetricFamily(f"{PREFIX}_model_loaded_timestamp_seconds",
                                "When the served model was loaded (Unix time)", value=loaded.at)
        reloads = CounterMetricFamily(f"{PREFIX}_model_reloads", "Model file reloads, by result (failed: the old "
                                      "model kept serving)", labels=["result"])
        reloads.add_metric(["loaded"], self.slot.reloads)
        reloads.add_metric(["failed"], self.slot.failures)
        yield reloads
        w = self.window.stats()
        yield GaugeMetricFamily(f"{PREFIX}_window_images", "Images in the recent window (scored by the served "
                                "model)", value=w.images)
        yield GaugeMetricFamily(f"{PREFIX}_window_flagged_ratio", "Share of the window's images scored above the "
                                "threshold (NaN while none has a verdict)", value=w.share)
        quantiles = GaugeMetricFamily(f"{PREFIX}_window_score", "Score quantiles over the recent window",
                                      labels=["quantile"])
        for q, value in w.quantiles.items():
            quantiles.add_metric([repr(q)], value)
        yield quantiles
        yield GaugeMetricFamily(f"{PREFIX}_window_target_fpr", "The served model's target false-alarm rate",
                                value=w.target)
        yield GaugeMetricFamily(f"{PREFIX}_window_drift", "1 while the flagged share is far above the target "
                                "(the drift warning is on), else 0", value=int(w.drifting))
