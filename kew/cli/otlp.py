"""Export over OTLP/HTTP for `kew demo --otlp-endpoint`.

SDK providers whose exporters note each batch they could not deliver, so the
demo can say truthfully whether its traces and metrics arrived: the SDK's
`force_flush` only says whether the flush ended in time (an export that
failed is logged, and still counts as flushed). This module imports the SDK
and the OTLP exporter (kew[otel]); kew.cli.demo imports it only when asked
to export.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
    OTLPMetricExporter,
)
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExportResult

__all__ = ["EXPORT_TIMEOUT", "OtlpExport"]

EXPORT_TIMEOUT = 3.0
"""Seconds one export may take, its retries included. The exporters' default
(10 s, per signal) kept a demo whose endpoint was unreachable waiting for
about 20 s at its end."""
_FLUSH_MILLIS = 10_000


class OtlpExport:
    """An SDK tracer provider and meter provider exporting to the OTLP/HTTP
    base URL `endpoint` (traces to /v1/traces, metrics to /v1/metrics)."""

    def __init__(self, endpoint: str, service: str) -> None:
        self.endpoint = endpoint
        self.failed: set[str] = set()
        """The signals ("traces", "metrics") of which a batch was not sent."""
        base = endpoint.rstrip("/")
        resource = Resource.create({"service.name": service})
        self.tracer_provider = TracerProvider(resource=resource)
        spans = _SpanExporter(self.failed, endpoint=f"{base}/v1/traces")
        self.tracer_provider.add_span_processor(BatchSpanProcessor(spans))
        reader = PeriodicExportingMetricReader(
            _MetricExporter(self.failed, endpoint=f"{base}/v1/metrics"),
            export_interval_millis=5_000,
        )
        self.meter_provider = MeterProvider(resource=resource, metric_readers=[reader])

    def close(self) -> set[str]:
        """Send what is left and shut both providers down (blocking HTTP);
        returns the signals that did not all reach the endpoint."""
        if not self.tracer_provider.force_flush(_FLUSH_MILLIS):
            self.failed.add("traces")
        self.tracer_provider.shutdown()
        # Its reader collects and exports one last time as it shuts down.
        self.meter_provider.shutdown(timeout_millis=_FLUSH_MILLIS)
        return set(self.failed)


class _SpanExporter(OTLPSpanExporter):
    def __init__(self, failed: set[str], *, endpoint: str) -> None:
        super().__init__(endpoint=endpoint, timeout=EXPORT_TIMEOUT)
        self._failed = failed

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = super().export(spans)
        if result is not SpanExportResult.SUCCESS:
            self._failed.add("traces")
        return result


class _MetricExporter(OTLPMetricExporter):
    def __init__(self, failed: set[str], *, endpoint: str) -> None:
        super().__init__(endpoint=endpoint, timeout=EXPORT_TIMEOUT)
        self._failed = failed

    def export(
        self,
        metrics_data: MetricsData,
        timeout_millis: float | None = 10_000,
        **kwargs: Any,
    ) -> MetricExportResult:
        result = super().export(metrics_data, timeout_millis, **kwargs)
        if result is not MetricExportResult.SUCCESS:
            self._failed.add("metrics")
        return result
