"""Grants everywhere: a scoped key reaches only the models and datasets it is granted, through every
route and every job parameter, and a job re-checks its key's grants in the worker.

The daemon runs with `run_jobs=false`, so a job that slipped through would stay queued and be counted
here, never run. Keys of every role are granted model `tl` and dataset `ds1`; the secrets are model
`secretmodel` and dataset `secretds` (ingested from a file whose id is known, as an attacker who saw a
job's parameters would know it).
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import Daemon, free_port, garrison_env, run_cli

from garrison.daemon.routes import ROUTES
from garrison.jobs.grants import RESOURCE_PARAMS
from garrison.jobs.kinds import JOB_KINDS
from garrison.policies.scopes import ROLES

ROWS = b'{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"hello"}]}\n' * 4


@pytest.fixture(scope="module")
def world(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("grants")
    state = root / "state"
    env = garrison_env(state, GARRISON_RUN_JOBS="false")
    for name in ("tl", "secretmodel"):
        run_cli(state, "models", "import", str(tiny_llama_dir), "--name", name, env=env)
    data = root / "rows.jsonl"
    data.write_bytes(ROWS)
    for dataset in ("ds1", "secretds"):
        run_cli(state, "ingest", str(data), "--dataset", dataset, "--plaintext", env=env)
    d = Daemon(state, free_port(), env, root / "daemon.log").start()
    admin = openai.OpenAI(base_url=d.url + "/v1", api_key=d.key("admin"), max_retries=0)
    secret_file = admin.files.create(file=("s.jsonl", io.BytesIO(ROWS.replace(b"hello", b"secret"))),
                                     purpose="fine-tune")
    status, _ = d.request("POST", "/v1/garrison/keys", {"role": "admin", "name": "x"})
    assert status == 201
    keys = {}
    for role in ROLES:
        status, body = d.request("POST", "/v1/garrison/keys", {"role": role, "models": ["tl"], "datasets": ["ds1"]})
        assert status == 201, body
        keys[role] = body["key"]
    # A job on the secrets, queued by the admin: others must neither see nor stop it.
    secret_job = admin.fine_tuning.jobs.create(model="secretmodel", training_file=secret_file.id)
    yield {"daemon": d, "keys": keys, "secret_file": secret_file.id, "secret_job": secret_job.id, "admin": admin}
    d.stop()


def _queued(d: Daemon) -> int:
    status, body = d.request("GET", "/v1/garrison/jobs?limit=1000")
    assert status == 200
    return len(body["data"])


def _refused(status: int, body: Any, role: str, scope: str) -> None:
    assert status == 403, (role, body)
    expected = "resource_not_granted" if scope in ROLES[role] else "insufficient_scope"
    assert body["error"]["code"] == expected, (role, body)


# -- the four bypasses of the issue, with keys of every role -------------------------------------------


@pytest.mark.parametrize("role", list(ROLES))
def test_fine_tune_on_a_dataset_outside_the_grant_is_refused(world: dict[str, Any], role: str) -> None:
    d = world["daemon"]
    before = _queued(d)
    client = openai.OpenAI(base_url=d.url + "/v1", api_key=world["keys"][role], max_retries=0)
    for training_file in (world["secret_file"], "secretds", "secretds:1"):
        with pytest.raises(openai.PermissionDeniedError) as err:
            client.fine_tuning.jobs.create(model="tl", training_file=training_file)
        body = err.value.body if isinstance(err.value.body, dict) else {}
        _refused(403, {"error": body}, role, "train")
        status, body = d.request("POST", "/v1/garrison/jobs", key=world["keys"][role],
                                 body={"kind": "finetune", "params": {"model": "tl", "training_file": "ds1",
                                                                      "validation_file": training_file}})
        assert status == 403, body
    assert _queued(d) == before


@pytest.mark.parametrize("role", list(ROLES))
def test_export_cannot_read_a_dataset_outside_the_grant_through_imatrix(world: dict[str, Any], role: str) -> None:
    d = world["daemon"]
    before = _queued(d)
    for imatrix in ("dataset:secretds", "dataset:secretds:1", f"dataset:{world['secret_file']}"):
        status, body = d.request("POST", "/v1/garrison/exports", key=world["keys"][role],
                                 body={"model": "tl", "to": ["gguf:q4_k_m"], "imatrix": imatrix})
        _refused(status, body, role, "export")
    assert _queued(d) == before


@pytest.mark.parametrize("role", list(ROLES))
def test_lists_show_only_what_the_key_is_granted(world: dict[str, Any], role: str) -> None:
    d = world["daemon"]
    key = world["keys"][role]
    status, models = d.request("GET", "/v1/garrison/models", key=key)
    if "read" not in ROLES[role]:
        assert status == 403
        return
    assert status == 200
    assert {m["id"] for m in models["data"]} == {"tl"}
    assert all("source" not in m for m in models["data"]) or role == "admin"
    status, jobs = d.request("GET", "/v1/garrison/jobs", key=key)
    assert status == 200 and world["secret_job"] not in {j["id"] for j in jobs["data"]}
    status, datasets = d.request("GET", "/v1/garrison/datasets", key=key)
    assert status == 200 and {x["name"] for x in datasets["data"]} == {"ds1"}
    status, files = d.request("GET", "/v1/files", key=key)
    assert status == 200 and world["secret_file"] not in {f["id"] for f in files["data"]}


@pytest.mark.parametrize("role", list(ROLES))
def test_jobs_on_other_resources_cannot_be_read_followed_or_cancelled(world: dict[str, Any], role: str) -> None:
    d = world["daemon"]
    key, job = world["keys"][role], world["secret_job"]
    for method, path in (("GET", f"/v1/garrison/jobs/{job}"), ("GET", f"/v1/garrison/jobs/{job}/events"),
                         ("POST", f"/v1/garrison/jobs/{job}/cancel"), ("GET", f"/v1/fine_tuning/jobs/{job}"),
                         ("GET", f"/v1/fine_tuning/jobs/{job}/events"), ("POST", f"/v1/fine_tuning/jobs/{job}/cancel"),
                         ("GET", f"/v1/fine_tuning/jobs/{job}/checkpoints")):
        status, body = d.request(method, path, key=key)
        assert status == 403, (role, method, path, body)
        assert body["error"]["code"] in ("resource_not_granted", "insufficient_scope"), body
    status, body = d.request("GET", f"/v1/garrison/jobs/{job}")
    assert status == 200 and body["state"] == "queued" and not body["cancel_requested"]


# -- derived from the router and the job kinds -----------------------------------------------------------

# Path parameters that name a model, a dataset or a file, and the secret each gets.
_PATH_SECRETS = {"model": "secretmodel", "version": "1", "file_id": "<secret file>"}
_RESOURCE_PATH_PARAMS = {"name", "model", "file_id"}
_BY_TAG = {"models": "secretmodel", "datasets": "secretds"}
# Body fields that name resources, by route, with the secret they get; the rest of the body is valid.
_BODIES: dict[tuple[str, str], list[dict[str, Any]]] = {
    ("POST", "/v1/garrison/exports"): [{"model": "secretmodel", "to": ["gguf:f16"]},
                                       {"model": "tl", "to": ["gguf:q4_k_m"], "imatrix": "dataset:secretds"},
                                       {"model": "tl", "to": ["gguf:f16"], "base_gguf": "secretmodel"}],
    ("POST", "/v1/fine_tuning/jobs"): [{"model": "secretmodel", "training_file": "ds1"},
                                       {"model": "tl", "training_file": "secretds"},
                                       {"model": "tl", "training_file": "ds1", "validation_file": "secretds"}],
    ("POST", "/v1/chat/completions"): [{"model": "secretmodel", "messages": [{"role": "user", "content": "x"}]}],
    ("POST", "/v1/completions"): [{"model": "secretmodel", "prompt": "x"}],
    ("POST", "/v1/embeddings"): [{"model": "secretmodel", "input": "x"}],
    ("POST", "/v1/garrison/render"): [{"model": "secretmodel", "messages": [{"role": "user", "content": "x"}]}],
    ("POST", "/v1/responses"): [{"model": "secretmodel", "input": "x"}],
    ("POST", "/api/chat"): [{"model": "secretmodel", "messages": [{"role": "user", "content": "x"}], "stream": False}],
    ("POST", "/api/generate"): [{"model": "secretmodel", "prompt": "x", "stream": False}],
    ("POST", "/api/embed"): [{"model": "secretmodel", "input": "x"}],
    ("POST", "/api/embeddings"): [{"model": "secretmodel", "prompt": "x"}],
    ("POST", "/api/show"): [{"model": "secretmodel"}],
    ("POST", "/v1/garrison/models"): [{"path": "/nonexistent", "name": "secretmodel"}],
    ("POST", "/v1/garrison/evals"): [{"models": ["tl", "secretmodel"], "dataset": "ds1"},
                                     {"models": ["tl"], "dataset": "secretds"}],
}
# Routes whose body may name a resource in a field called one of these.
_RESOURCE_FIELDS = {"model", "models", "training_file", "validation_file", "imatrix", "base_gguf", "dataset", "name"}
# Not resource-scoped, with why.
_UNSCOPED = {
    ("POST", "/v1/garrison/jobs"): "covered by the job-kind test below, parameter by parameter",
    ("POST", "/v1/garrison/keys"): "admin only; 'name' is the key's label",
    ("POST", "/v1/files"): "a multipart form: test_an_upload_into_a_dataset_outside_the_grant_is_refused",
}


def _resource_routes() -> list[tuple[str, str]]:
    found = []
    for route in ROUTES:
        props = set((route.body or {}).get("properties") or {})
        path_names = set(re.findall(r"{(\w+)}", route.path))
        names_resource = bool(path_names & _RESOURCE_PATH_PARAMS) or bool(props & _RESOURCE_FIELDS)
        if names_resource and route.key not in _UNSCOPED:
            found.append(route.key)
    return found


def test_every_route_that_names_a_resource_is_covered() -> None:
    routes = _resource_routes()
    assert routes, "the router lost its routes?"
    for key in routes:
        method, path = key
        assert key in _BODIES or re.search(r"{(name|model|file_id)}", path), \
            f"{method} {path} names a resource: add it here"


@pytest.mark.parametrize("key", _resource_routes(), ids=lambda k: f"{k[0]} {k[1]}")
def test_every_route_refuses_resources_outside_the_grant(world: dict[str, Any], key: tuple[str, str]) -> None:
    d = world["daemon"]
    method, path = key
    route = next(r for r in ROUTES if r.key == key)
    before = _queued(d)
    filled = path
    for name in re.findall(r"{(\w+)}", path):
        value = _BY_TAG.get(route.tag, "secretmodel") if name == "name" else _PATH_SECRETS.get(name, "x")
        value = world["secret_file"] if value == "<secret file>" else value
        filled = filled.replace("{" + name + "}", str(value))
    bodies = _BODIES.get(key) or [None]
    for role in ROLES:
        if route.scope not in ROLES[role]:
            continue  # refused by scope before anything else (tests/daemon/test_routes_auth.py)
        for body in bodies:
            if method == "POST" and "/versions" in path:
                status, answer = _upload(d, filled, world["keys"][role])
            else:
                status, answer = d.request(method, filled, body, key=world["keys"][role])
            assert status in (403, 404), (role, method, filled, body, answer)
            if status == 404:  # hidden exactly as a resource that does not exist
                error = answer["error"]
                code = error["code"] if isinstance(error, dict) else answer.get("code", "")  # Ollama's shape
                assert code.endswith("not_found"), answer
    assert _queued(d) == before
    for path in ("/v1/garrison/models/secretmodel", "/v1/garrison/datasets/secretds",
                 f"/v1/files/{world['secret_file']}"):
        status, _ = d.request("GET", path)
        assert status == 200, f"a refused request changed {path}"


@pytest.mark.parametrize("role", [r for r in ROLES if "ingest" in ROLES[r]])
def test_an_upload_into_a_dataset_outside_the_grant_is_refused(world: dict[str, Any], role: str) -> None:
    """POST /v1/files takes its dataset from a multipart field, not a JSON body."""
    client = openai.OpenAI(base_url=world["daemon"].url + "/v1", api_key=world["keys"][role], max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        client.files.create(file=("x.jsonl", io.BytesIO(ROWS)), purpose="fine-tune",
                            extra_body={"dataset": "secretds"})
    status, body = world["daemon"].request("GET", "/v1/garrison/datasets/secretds")
    assert status == 200 and body["versions"] == 1, body


def _upload(d: Daemon, path: str, key: str) -> tuple[int, Any]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(d.url + path, data=b"not sealed", method="POST",
                                 headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


# Job parameters that are not resources, with why; a new string parameter must be classified.
_NOT_RESOURCES = {
    ("selftest", "probe_address"): "a network address the guard must refuse (admin only)",
    ("build-default-model", "size"): "a size label",
    ("export", "to"): "export targets",
    ("finetune", "hyperparameters"): "numbers as JSON",
    ("finetune", "method"): "lora or full",
    ("finetune", "suffix"): "part of the new model's name",
    ("finetune", "export"): "export targets",
    ("prune", "depth"): "a count or percentage",
    ("prune", "width"): "a count or percentage",
    ("prune", "heads"): "a count or percentage",
    ("prune", "hidden"): "a count or percentage",
    ("prune", "suffix"): "part of the new model's name",
    ("prune", "export"): "export targets",
    ("distill", "method"): "full or lora",
    ("distill", "hyperparameters"): "numbers as JSON",
    ("distill", "suffix"): "part of the new model's name",
    ("distill", "export"): "export targets",
}


def test_every_string_job_parameter_is_classified() -> None:
    resource_params = {(row.kind, row.param) for row in RESOURCE_PARAMS}
    for kind in JOB_KINDS.values():
        for param in kind.params:
            if param.kind is str:
                key = (kind.name, param.name)
                assert key in resource_params or key in _NOT_RESOURCES, f"classify job parameter {key}"


_VALID = {"export": {"model": "tl", "to": "gguf:q4_k_m"}, "finetune": {"model": "tl", "training_file": "ds1"},
          "eval": {"models": "tl", "dataset": "ds1"}, "prune": {"model": "tl", "depth": "1"},
          "distill": {"teacher": "tl", "student": "tl", "dataset": "ds1"}}
_SECRET_VALUE = {"model": "secretmodel", "base_gguf": "secretmodel", "imatrix": "dataset:secretds",
                 "training_file": "secretds", "validation_file": "secretds", "models": "tl,secretmodel",
                 "dataset": "secretds", "calibration": "secretds", "eval": "secretds",
                 "teacher": "secretmodel", "student": "secretmodel"}


@pytest.mark.parametrize("row", RESOURCE_PARAMS, ids=lambda r: f"{r.kind}.{r.param}")
def test_every_resource_parameter_of_every_job_kind_is_authorized(world: dict[str, Any], row: Any) -> None:
    d = world["daemon"]
    before = _queued(d)
    scope = JOB_KINDS[row.kind].scope
    for role in ROLES:
        params = {**_VALID[row.kind], row.param: _SECRET_VALUE[row.param]}
        status, body = d.request("POST", "/v1/garrison/jobs", key=world["keys"][role],
                                 body={"kind": row.kind, "params": params})
        if "read" not in ROLES[role]:
            assert status == 403
            continue
        _refused(status, body, role, scope)
    assert _queued(d) == before


def test_a_job_whose_key_lost_its_grant_fails_in_the_worker(world: dict[str, Any],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Submission passed; the key was revoked before a worker ran it: the worker refuses, nothing opened."""
    import asyncio

    from garrison.config import load_config
    from garrison.jobs.runner import JobRunner, RunnerSettings
    from garrison.operations.appliance import open_appliance
    from garrison.operations.jobs import submit_job
    from garrison.policies.keys import KeyStore

    d = world["daemon"]
    for name, value in d.env.items():  # this process acts on the daemon's state folder, with its master key
        if name.startswith(("GARRISON_", "XDG_")):
            monkeypatch.setenv(name, value)
    app = open_appliance(load_config("/dev/null", overrides={"state_dir": str(d.state_dir)}))
    keys = KeyStore(app.catalog)
    record, _secret = keys.create("train", models=["tl"], datasets=["ds1"])
    job = submit_job(app, keys.principal(record.id), "finetune", {"model": "tl", "training_file": "ds1",
                                                                  "max_steps": 1})
    assert [f"{k}:{n}" for k, n in job.resources] == ["model:tl", "dataset:ds1"]
    keys.revoke(record.id)
    runner = JobRunner(app.jobs, lambda: RunnerSettings(poll_s=0.05, heartbeat_s=0.2))
    done = asyncio.run(asyncio.wait_for(runner.run_until_done(job.id), 120))
    assert done.state == "failed" and done.error_code == "principal_inactive", done
    assert "train" not in {e.type for e in app.jobs.events(job.id)}


# -- what used to fail only inside the worker fails at submission, and names no host path ------------------

_SUBMISSION_REFUSALS = [
    ("export", {"model": "tl", "to": "gguf:q9_z"}, "admin", 400, "unknown_export_target"),
    ("export", {"model": "nosuch", "to": "gguf:f16"}, "admin", 404, "model_not_found"),
    ("export", {"model": "tl", "to": "gguf:q4_k_m", "imatrix": "dataset:nosuch"}, "admin", 404, None),
    ("export", {"model": "tl", "to": "gguf:q4_k_m", "imatrix": "/etc/passwd"}, "admin", 400, "imatrix_invalid"),
    ("export", {"model": "tl", "to": "gguf:q4_k_m", "imatrix": "/etc/passwd"}, "operator", 403,
     "host_path_not_allowed"),
    ("export", {"model": "tl", "to": "gguf:q4_k_m", "imatrix": "/nonexistent.gguf"}, "operator", 403,
     "host_path_not_allowed"),
    ("finetune", {"model": "tl", "training_file": "ds1", "suffix": "../x"}, "admin", 400, "invalid_model_name"),
    ("finetune", {"model": "tl", "training_file": "ds1", "method": "qlora"}, "admin", 400, None),
    ("finetune", {"model": "tl", "training_file": "ds1", "hyperparameters": "{\"n_epochz\": 1}"}, "admin", 400,
     None),
    ("finetune", {"model": "tl", "training_file": "ds1", "export": "onnx:int3"}, "admin", 400,
     "unknown_export_target"),
    ("finetune", {"model": "tl", "training_file": "ds1:7"}, "admin", 404, None),
    ("finetune", {"model": "tl", "training_file": "file-0123456789abcdef01234567"}, "admin", 404, "file_not_found"),
]


@pytest.mark.parametrize(("kind", "params", "role", "status", "code"), _SUBMISSION_REFUSALS)
def test_bad_parameters_are_refused_at_submission(world: dict[str, Any], kind: str, params: dict[str, Any],
                                                  role: str, status: int, code: str | None) -> None:
    d = world["daemon"]
    before = _queued(d)
    key = d.key("admin") if role == "admin" else world["keys"][role]
    got, body = d.request("POST", "/v1/garrison/jobs", {"kind": kind, "params": params}, key=key)
    assert got == status, body
    if code:
        assert body["error"]["code"] == code, body
    assert "/etc/passwd" not in json.dumps(body) or code == "imatrix_invalid"
    assert _queued(d) == before


def test_a_restricted_admin_cannot_mint_a_wider_key(world: dict[str, Any]) -> None:
    d = world["daemon"]
    key = world["keys"]["admin"]  # granted model tl and dataset ds1 only
    for body in ({"role": "admin"}, {"role": "read", "models": ["tl", "secretmodel"], "datasets": ["ds1"]},
                 {"role": "read", "models": ["tl"]}):
        status, answer = d.request("POST", "/v1/garrison/keys", body, key=key)
        assert status == 403 and answer["error"]["code"] == "resource_not_granted", (body, answer)
    status, answer = d.request("POST", "/v1/garrison/keys", {"role": "read", "models": ["tl"], "datasets": []},
                               key=key)
    assert status == 201, answer
    status, listed = d.request("GET", "/v1/garrison/keys", key=key)
    assert status == 200 and all(k["models"] is not None and set(k["models"]) <= {"tl"} for k in listed["data"])
    everyone = d.request("GET", "/v1/garrison/keys")[1]["data"]
    unrestricted = next(k for k in everyone if k["models"] is None)
    status, answer = d.request("DELETE", f"/v1/garrison/keys/{unrestricted['id']}", key=key)
    assert status == 404, answer
