"""Evaluations as operations: start a comparison, list and read stored ones, for every face alike.

Starting one is submitting an `eval` job (its scope and grants, `garrison.operations.jobs`).
Reading follows the grants: a key sees a comparison only when it is granted its dataset and
every model in it (the table would tell it how they score on data it may not see).
"""

from __future__ import annotations

from typing import Any

from garrison.errors import InvalidRequest, PermissionDenied
from garrison.jobs.grants import may_see
from garrison.jobs.store import Job
from garrison.models.evaluations import Evaluation, EvaluationStore
from garrison.operations.appliance import Appliance
from garrison.operations.jobs import submit_job
from garrison.policies.access import authorize
from garrison.policies.keys import Principal


def start_evaluation(app: Appliance, who: Principal, models: list[str] | str, dataset: str, *,
                     max_new_tokens: int | None = None, max_records: int | None = None) -> Job:
    if isinstance(models, list):
        if not all(isinstance(m, str) for m in models):
            raise InvalidRequest("'models' must be a list of model names", param="models")
        models = ",".join(models)
    params: dict[str, Any] = {"models": models, "dataset": dataset}
    if max_new_tokens is not None:
        params["max_new_tokens"] = max_new_tokens
    if max_records is not None:
        params["max_records"] = max_records
    return submit_job(app, who, "eval", params)


def _resources(evaluation: Evaluation) -> list[tuple[str, str]]:
    dataset = evaluation.dataset.rpartition(":")[0] or evaluation.dataset
    return [("dataset", dataset), *(("model", m) for m in evaluation.models)]


def get_evaluation(app: Appliance, who: Principal, evaluation_id: str) -> Evaluation:
    authorize(who, "read")
    evaluation = EvaluationStore(app.catalog).get(evaluation_id)
    if not may_see(who, _resources(evaluation)):
        raise PermissionDenied(f"this key is not granted every model and the dataset of {evaluation_id}",
                               code="resource_not_granted", details={"evaluation": evaluation_id})
    return evaluation


def list_evaluations(app: Appliance, who: Principal, *, model: str | None = None, dataset: str | None = None,
                     limit: int = 50) -> list[Evaluation]:
    authorize(who, "read")
    found = EvaluationStore(app.catalog).list(model=model, dataset=dataset, limit=limit)
    return [e for e in found if may_see(who, _resources(e))]


def evaluation_json(evaluation: Evaluation) -> dict[str, Any]:
    """What the faces return: the stored comparison and its side-by-side table as text."""
    return evaluation.to_json() | {"table": evaluation.table()}
