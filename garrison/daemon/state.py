"""Typed application state: what every handler may reach, under aiohttp AppKeys."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from aiohttp import web

from garrison.config import Config
from garrison.crypto.identity import IdentityCache
from garrison.jobs.runner import JobRunner, RunnerSettings
from garrison.jobs.store import JobStore
from garrison.models.registry import ModelRegistry
from garrison.operations.policy import AppliancePolicy
from garrison.policies.keys import KeyStore
from garrison.serving.manager import ModelManager
from garrison.store.catalog import Catalog


@dataclass
class DaemonState:
    """Mutable on purpose: SIGHUP swaps `config` and `policy` (each replaced whole, never edited, so a
    request reads either the old one or the new one); shutdown flips `shutting_down`."""

    config: Config
    catalog: Catalog
    keys: KeyStore
    jobs: JobStore
    models: ModelRegistry
    manager: ModelManager
    policy: AppliancePolicy = field(default_factory=AppliancePolicy)
    started_at: float = field(default_factory=time.time)
    shutting_down: asyncio.Event = field(default_factory=asyncio.Event)
    identity_cache: IdentityCache = field(default_factory=IdentityCache)
    runner: JobRunner | None = None
    reloads: int = 0
    in_flight: int = 0

    def runner_settings(self) -> RunnerSettings:
        c = self.config
        return RunnerSettings(concurrency=c.job_concurrency, poll_s=c.job_poll_s,
                              heartbeat_s=c.job_heartbeat_s, stale_after_s=c.job_stale_after_s,
                              shutdown_grace_s=c.shutdown_grace_s)


STATE = web.AppKey("state", DaemonState)
