"""Prometheus metrics, one registry per app (tests run several apps in one process)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from garrison.jobs.store import STATES, JobStore
from garrison.serving.manager import ModelManager


@dataclass
class Metrics:
    registry: CollectorRegistry
    requests: Counter
    latency: Histogram
    in_flight: Gauge
    rate_limited: Counter
    key_tokens: Counter


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


class _ModelCollector(Collector):
    """Engine counters of every loaded model, read at scrape time."""

    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager

    def collect(self) -> Iterator[Metric]:
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "active_slots": GaugeMetricFamily("garrison_model_active_slots",
                                              "Sequences generating now, per loaded model.", labels=["model"]),
            "queued_requests": GaugeMetricFamily("garrison_model_queued_requests",
                                                 "Requests waiting for a slot, per loaded model.", labels=["model"]),
            "n_parallel": GaugeMetricFamily("garrison_model_slots", "Parallel sequence slots, per loaded model.",
                                            labels=["model"]),
            "tokens_generated": CounterMetricFamily("garrison_model_tokens_generated",
                                                    "Tokens generated, per loaded model.", labels=["model"]),
            "prompt_tokens_evaluated": CounterMetricFamily("garrison_model_prompt_tokens_evaluated",
                                                           "Prompt tokens evaluated.", labels=["model"]),
            "prompt_tokens_reused": CounterMetricFamily("garrison_model_prompt_tokens_reused",
                                                        "Prompt tokens served from the KV cache.", labels=["model"]),
        }
        for name, info in self.manager.stats().items():
            for key, family in families.items():
                if key in info["engine"]:
                    family.add_metric([name], info["engine"][key])
        yield from families.values()
        yield GaugeMetricFamily("garrison_models_loaded", "Models in memory.", value=len(self.manager.loaded))
        crashes = CounterMetricFamily("garrison_runner_crashes", "Model runner processes that died unasked, by "
                                      "model and how (SIGSEGV, exit 1, ...).", labels=["model", "how"])
        for (model, how), count in sorted(self.manager.crashes.items()):
            crashes.add_metric([model, how], count)
        yield crashes
        failed = GaugeMetricFamily("garrison_models_failed", "Models whose runner crashed too often in a row.",
                                   value=sum(1 for h in self.manager.health.values() if h.failed_reason))
        yield failed


def make_metrics(jobs: JobStore, active_workers: Callable[[], int], manager: ModelManager | None = None) -> Metrics:
    registry = CollectorRegistry(auto_describe=True)
    metrics = Metrics(
        registry=registry,
        requests=Counter("garrison_http_requests", "HTTP requests by route and status.",
                         ["method", "route", "status"], registry=registry),
        latency=Histogram("garrison_http_request_duration_seconds", "HTTP request latency by route.",
                          ["method", "route"], registry=registry,
                          buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)),
        in_flight=Gauge("garrison_http_requests_in_flight", "Requests being handled now.", registry=registry),
        rate_limited=Counter("garrison_rate_limited", "Requests refused (429) by a key's rate limit, by key and "
                             "limit (requests, tokens, concurrency).", ["key", "limit"], registry=registry),
        key_tokens=Counter("garrison_key_tokens", "Tokens used by inference, by key and kind (prompt, "
                           "completion).", ["key", "kind"], registry=registry),
    )
    registry.register(_JobCollector(jobs, active_workers))
    if manager is not None:
        registry.register(_ModelCollector(manager))
    return metrics


def render_metrics(metrics: Metrics) -> tuple[bytes, str]:
    return generate_latest(metrics.registry), CONTENT_TYPE_LATEST


METRICS = web.AppKey("metrics", Metrics)
