"""Prometheus metrics, one registry per app (tests run several apps in one process)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from garrison.jobs.store import STATES, JobStore


@dataclass
class Metrics:
    registry: CollectorRegistry
    requests: Counter
    latency: Histogram
    in_flight: Gauge


class _JobCollector(Collector):
    """Reads job counts from the catalog at scrape time, so the CLI's jobs count too."""

    def __init__(self, jobs: JobStore, active_workers: Callable[[], int]) -> None:
        self.jobs = jobs
        self.active_workers = active_workers

    def collect(self) -> Iterator[Metric]:
        by_state = GaugeMetricFamily("garrison_jobs", "Jobs in the catalog by state.", labels=["state"])
        counts = self.jobs.counts_by_state()
        for state in STATES:
            by_state.add_metric([state], counts.get(state, 0))
        yield by_state
        yield GaugeMetricFamily("garrison_job_queue_depth", "Jobs waiting to run.",
                                value=counts.get("queued", 0))
        yield GaugeMetricFamily("garrison_job_workers_active",
                                "Worker subprocesses this daemon runs now.", value=self.active_workers())


def make_metrics(jobs: JobStore, active_workers: Callable[[], int]) -> Metrics:
    registry = CollectorRegistry(auto_describe=True)
    metrics = Metrics(
        registry=registry,
        requests=Counter("garrison_http_requests", "HTTP requests by route and status.",
                         ["method", "route", "status"], registry=registry),
        latency=Histogram("garrison_http_request_duration_seconds", "HTTP request latency by route.",
                          ["method", "route"], registry=registry,
                          buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)),
        in_flight=Gauge("garrison_http_requests_in_flight", "Requests being handled now.", registry=registry),
    )
    registry.register(_JobCollector(jobs, active_workers))
    return metrics


def render_metrics(metrics: Metrics) -> tuple[bytes, str]:
    return generate_latest(metrics.registry), CONTENT_TYPE_LATEST


METRICS = web.AppKey("metrics", Metrics)
