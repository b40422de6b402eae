"""The aiohttp app factory: tests call `create_app` with their own configuration."""

from __future__ import annotations

from aiohttp import web

from garrison.config import Config
from garrison.crypto.identity import IdentityCache
from garrison.daemon import cors
from garrison.daemon.console import pages as console_pages
from garrison.daemon.console import sessions as console_sessions
from garrison.daemon.console.security import console_middleware
from garrison.daemon.metrics import METRICS, make_metrics
from garrison.daemon.middleware import (
    ROUTE_TABLE,
    auth_middleware,
    error_middleware,
    metrics_middleware,
    rate_limit_middleware,
)
from garrison.daemon.routes import ROUTES
from garrison.daemon.state import STATE, DaemonState
from garrison.daemon.usage import install as install_usage
from garrison.errors import InvalidRequest
from garrison.ingest.pipeline import policy_file
from garrison.jobs.store import JobStore
from garrison.models.registry import ModelRegistry
from garrison.operations.policy import AppliancePolicy, load_appliance_policy
from garrison.paths import StateLayout
from garrison.policies.keys import KeyStore
from garrison.serving.manager import ManagerSettings, ModelManager, default_budget_bytes
from garrison.store.catalog import Catalog


def manager_settings(config: Config) -> ManagerSettings:
    return ManagerSettings(memory_budget_bytes=default_budget_bytes(config.model_memory_mb),
                           keep_alive_s=config.model_keep_alive_s, max_queue=config.model_queue,
                           n_threads=config.inference_threads or None, cpu_repack=config.cpu_repack,
                           max_crashes=config.runner_max_crashes)


def load_policy(config: Config) -> AppliancePolicy:
    """The policy file, validated whole; a refusal names the file and the key (at start: no start; on
    SIGHUP: the old policy keeps running)."""
    try:
        return load_appliance_policy(config)
    except InvalidRequest as exc:
        where = f" (key {exc.param})" if exc.param and exc.param not in exc.message else ""
        raise InvalidRequest(f"policy file {policy_file(config)}: {exc.message}{where}", code="invalid_policy",
                             param=exc.param) from None


def create_app(config: Config, catalog: Catalog | None = None) -> web.Application:
    policy = load_policy(config)  # before anything is opened: a bad policy stops the start here
    if catalog is None:
        layout = StateLayout(config.state_path)
        layout.ensure()
        catalog = Catalog(layout.catalog)
    app = web.Application(
        middlewares=[metrics_middleware, error_middleware, console_middleware, cors.cors_middleware,
                     auth_middleware, rate_limit_middleware],
        client_max_size=int(config.max_request_mb * 1024 * 1024),
    )
    jobs = JobStore(catalog)
    identities = IdentityCache()
    models = ModelRegistry(catalog, StateLayout(config.state_path),
                           signer=lambda: identities.get(app[STATE].config))
    models.reap_staging()
    manager = ModelManager(models, manager_settings(config))
    state = DaemonState(config=config, catalog=catalog, keys=KeyStore(catalog), jobs=jobs, models=models,
                        manager=manager, policy=policy, identity_cache=identities)
    app[STATE] = state
    install_usage(app, catalog)
    cors.install(app)
    console_sessions.install(app)
    app[METRICS] = make_metrics(jobs, lambda: len(state.runner.active) if state.runner else 0, manager)
    table = {}
    for route in (*ROUTES, *console_pages.ROUTES):  # the console's pages are not API: not in /openapi.json
        app.router.add_route(route.method, route.path, route.handler)
        table[route.key] = route
    app[ROUTE_TABLE] = table

    async def on_shutdown(app: web.Application) -> None:
        app[STATE].shutting_down.set()

    app.on_shutdown.append(on_shutdown)
    return app
