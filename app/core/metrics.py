"""Prometheus metrics of the API (served at /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mergeline_http_requests_total", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "mergeline_http_request_seconds",
            "HTTP request latency",
            ["method", "route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60),
            registry=self.registry,
        )
        self.upload_bytes = Counter(
            "mergeline_upload_bytes_total", "Checkpoint bytes accepted", ["kind"], registry=self.registry
        )
        self.upload_rejections = Counter(
            "mergeline_upload_rejections_total", "Rejected uploads", ["code"], registry=self.registry
        )
