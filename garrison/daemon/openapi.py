"""The OpenAPI 3.1 document, built from the route table (never written by hand)."""

from __future__ import annotations

import re
from typing import Any

from garrison import __version__
from garrison.daemon.routes import ROUTES
from garrison.policies.scopes import SCOPES

_PARAM = re.compile(r"{(\w+)}")

_NAME = "^[A-Za-z0-9][A-Za-z0-9._-]*$"
# Path parameters by name, as the handlers check them: anything else is a 400 (or a 404 for an id that
# no record can have). The fuzz (tests/daemon/test_fuzz.py) generates values from these.
PATH_PARAMS: dict[str, dict[str, Any]] = {
    "name": {"type": "string", "pattern": _NAME, "maxLength": 128},
    "model": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]*(:[a-z0-9][a-z0-9._-]*)?$",
              "maxLength": 129},
    "version": {"type": "integer", "minimum": 1, "maximum": 2**63 - 1},
    "job_id": {"type": "string", "pattern": "^job_[0-9a-f]{20}$"},
    "file_id": {"type": "string", "pattern": "^file-[0-9a-f]{24}$"},
    "key_id": {"type": "string", "pattern": "^key_[0-9a-f]{16}$"},
    "evaluation_id": {"type": "string", "pattern": "^eval_[0-9a-f]{16}$"},
    "response_id": {"type": "string", "pattern": "^resp_[0-9a-f]{48}$"},
    "digest": {"type": "string", "pattern": "^sha256[:-][0-9a-f]{64}$"},  # Ollama's blobs (refused)
}

_ERROR = {
    "type": "object",
    "properties": {"error": {"type": "object", "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": "string"}}}},
}


def build_openapi() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        op: dict[str, Any] = {
            "operationId": route.handler.__name__,
            "summary": route.summary,
            "tags": [route.tag],
            "responses": {code: {"description": text} for code, text in route.responses.items()},
        }
        params = [{"name": n, "in": "path", "required": True, "schema": PATH_PARAMS[n]}
                  for n in _PARAM.findall(route.path)]
        params += [{"name": n, "in": "query", "required": False, "schema": {"type": t}, "description": d}
                   for n, t, d in route.query]
        if params:
            op["parameters"] = params
        if route.body is not None:
            op["requestBody"] = {"required": True, "content": {route.body_type: {"schema": route.body}}}
        if route.scope is None:
            op["security"] = []
        else:
            op["security"] = [{"bearer": []}]
            op["x-garrison-scope"] = route.scope
            op["responses"].setdefault("401", {"description": "missing or invalid key",
                                               "content": {"application/json": {"schema": _ERROR}}})
            op["responses"].setdefault("403", {"description": f"key lacks the {route.scope!r} scope",
                                               "content": {"application/json": {"schema": _ERROR}}})
        if route.streaming:
            op["x-garrison-streaming"] = "text/event-stream"
        paths.setdefault(route.path, {})[route.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "Garrison", "version": __version__,
                 "description": "On-premises LLM appliance. Every route but /health needs a key "
                                "('Authorization: Bearer grs_...') with the scope shown as "
                                f"x-garrison-scope (scopes: {', '.join(SCOPES)})."},
        "paths": paths,
        "components": {"securitySchemes": {"bearer": {
                           "type": "http", "scheme": "bearer", "bearerFormat": "grs_<43 characters>",
                           "description": "An API key (`garrison keys create`); X-Api-Key: works too."}},
                       "schemas": {"Error": _ERROR}},
        "security": [{"bearer": []}],
    }


def render_markdown(spec: dict[str, Any]) -> str:
    """docs/api.md: the API reference generated from the spec (a test keeps it current)."""
    lines = [f"# Garrison HTTP API ({spec['info']['version']})", "",
             "Generated from `/openapi.json` by `garrison docs api`; do not edit by hand.", "",
             spec["info"]["description"], "",
             "Errors use OpenAI's shape: `{\"error\": {\"message\", \"type\", \"param\", \"code\"}}` "
             "with a stable `code`.", "",
             "| method | path | scope | summary |", "|---|---|---|---|"]
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            scope = op.get("x-garrison-scope", "none")
            lines.append(f"| {method.upper()} | `{path}` | {scope} | {op['summary']} |")
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            lines += ["", f"## {method.upper()} {path}", "", op["summary"], ""]
            lines.append(f"Scope: `{op.get('x-garrison-scope', 'none (no key)')}`")
            params = op.get("parameters", [])
            if params:
                lines += ["", "| parameter | in | type | description |", "|---|---|---|---|"]
                lines += [f"| `{p['name']}` | {p['in']} | {p['schema']['type']} | {p.get('description', '')} |"
                          for p in params]
            body = op.get("requestBody")
            if body:
                media, content = next(iter(body["content"].items()))
                schema = content["schema"]
                required = set(schema.get("required", []))
                lines += ["", f"Body ({media}):", "", "| field | type | required |", "|---|---|---|"]
                lines += [f"| `{name}` | {prop.get('type', 'any')} | {'yes' if name in required else 'no'} |"
                          for name, prop in schema.get("properties", {}).items()]
            lines += ["", "Responses: " + ", ".join(f"{code} {r['description']}"
                                                    for code, r in op["responses"].items())]
    return "\n".join(lines) + "\n"
