"""Every route of the daemon, gathered from the resource modules' tables."""

from __future__ import annotations

from garrison.daemon.api import (
    audit,
    datasets,
    evals,
    exports,
    files,
    fine_tuning,
    identity,
    inference,
    jobs,
    keys,
    models,
    ollama,
    render,
    responses,
    runners,
    system,
)
from garrison.daemon.routing import Route

ROUTES: tuple[Route, ...] = (*system.ROUTES, *jobs.ROUTES, *keys.ROUTES, *audit.ROUTES, *models.ROUTES, *runners.ROUTES,
                             *inference.ROUTES, *responses.ROUTES, *render.ROUTES, *identity.ROUTES,
                             *exports.ROUTES, *datasets.ROUTES, *files.ROUTES,
                             *fine_tuning.ROUTES, *evals.ROUTES, *ollama.ROUTES)
