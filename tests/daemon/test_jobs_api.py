"""Jobs over HTTP: create, long-poll, SSE progress, cancel; the CLI and the daemon
share the catalog, so what one does the other sees at once."""

from __future__ import annotations

import json
import time
import urllib.request

from conftest import Daemon, run_cli


def _sse(daemon: Daemon, job_id: str) -> list[tuple[str, dict[str, object]]]:
    req = urllib.request.Request(f"{daemon.url}/v1/garrison/jobs/{job_id}/events?stream=true",
                                 headers={"Authorization": f"Bearer {daemon.key('read')}"})
    events: list[tuple[str, dict[str, object]]] = []
    with urllib.request.urlopen(req, timeout=60) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        name = ""
        for raw in response:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    return events


def test_sse_streams_progress_until_done(daemon: Daemon) -> None:
    status, job = daemon.request("POST", "/v1/garrison/jobs",
                                 {"kind": "selftest", "params": {"steps": 10, "step_s": 0.05}})
    assert status == 201 and job["state"] == "queued"
    events = _sse(daemon, job["id"])
    names = [n for n, _ in events]
    assert names[-1] == "done" and events[-1][1]["state"] == "succeeded"
    fractions = [float(d["fraction"]) for n, d in events if n == "progress"]  # type: ignore[arg-type]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(fractions) >= 3
    kinds = [d["type"] for n, d in events if n == "event"]
    assert kinds == ["queued", "started", "succeeded"]


def test_create_validation_and_errors(daemon: Daemon) -> None:
    status, body = daemon.request("POST", "/v1/garrison/jobs", {"kind": "mine-bitcoin"})
    assert status == 400 and body["error"]["code"] == "unknown_job_kind"
    status, body = daemon.request("POST", "/v1/garrison/jobs", {"kind": "selftest", "params": {"steps": "x"}})
    assert status == 400 and body["error"]["param"] == "steps"
    status, body = daemon.request("POST", "/v1/garrison/jobs", {"kind": "selftest", "params": {"nope": 1}})
    assert status == 400 and body["error"]["code"] == "unknown_parameter"
    req = urllib.request.Request(daemon.url + "/v1/garrison/jobs", data=b"{not json", method="POST",
                                 headers={"Authorization": f"Bearer {daemon.key()}"})
    try:
        urllib.request.urlopen(req)
        raise AssertionError("expected 400")
    except urllib.error.HTTPError as err:
        assert err.code == 400 and json.loads(err.read())["error"]["code"] == "invalid_json"
    status, body = daemon.request("GET", "/v1/garrison/jobs/job_missing")
    assert status == 404 and body["error"]["code"] == "job_not_found"
    status, jobs = daemon.request("GET", "/v1/garrison/jobs")
    assert status == 200 and jobs["data"] == []  # refused requests changed nothing


def test_cancel_over_http_and_cli_key_seen_by_daemon(daemon: Daemon) -> None:
    status, job = daemon.request("POST", "/v1/garrison/jobs",
                                 {"kind": "selftest", "params": {"steps": 400, "step_s": 0.02}})
    deadline = time.monotonic() + 20
    while daemon.request("GET", f"/v1/garrison/jobs/{job['id']}")[1]["state"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    status, body = daemon.request("POST", f"/v1/garrison/jobs/{job['id']}/cancel")
    assert status == 200 and body["cancel_requested"]
    status, final = daemon.request("GET", f"/v1/garrison/jobs/{job['id']}?wait=30")
    assert final["state"] == "cancelled"
    status, body = daemon.request("POST", f"/v1/garrison/jobs/{job['id']}/cancel")
    assert status == 409

    # A key made by the CLI works at once; revoked by the CLI, it stops at once.
    secret = run_cli(daemon.state_dir, "keys", "create", "--role", "read", env=daemon.env).stdout.strip()
    assert daemon.request("GET", "/ready", key=secret)[0] == 200
    key_id = json.loads(run_cli(daemon.state_dir, "keys", "list", "--json", env=daemon.env).stdout)[-1]["id"]
    run_cli(daemon.state_dir, "keys", "revoke", key_id, env=daemon.env)
    status, body = daemon.request("GET", "/ready", key=secret)
    assert status == 401 and body["error"]["code"] == "api_key_revoked"


def test_cli_job_runs_in_the_daemon_when_it_runs(daemon: Daemon) -> None:
    proc = run_cli(daemon.state_dir, "selftest", "--steps", "3", "--step-s", "0.01", "--json", env=daemon.env)
    job = json.loads(proc.stdout)
    assert job["state"] == "succeeded"
    assert f"job={job['id']}" in daemon.log()  # the daemon's runner ran it


def test_keys_over_http_and_metrics(daemon: Daemon) -> None:
    status, created = daemon.request("POST", "/v1/garrison/keys", {"role": "infer", "models": ["bot"]})
    assert status == 201 and created["key"].startswith("grs_") and created["models"] == ["bot"]
    status, listing = daemon.request("GET", "/v1/garrison/keys")
    assert all("key" not in k and "hash" not in k for k in listing["data"])
    assert daemon.request("DELETE", f"/v1/garrison/keys/{created['id']}")[1]["status"] == "revoked"
    status, body = daemon.request("POST", "/v1/garrison/keys", {"role": "god"})
    assert status == 400 and body["error"]["code"] == "invalid_role"
    status, text = daemon.request("GET", "/metrics")
    assert status == 200
    assert 'garrison_http_requests_total{method="POST",route="/v1/garrison/keys",status="201"} 1.0' in text
    assert 'garrison_jobs{state="queued"}' in text and "garrison_job_queue_depth" in text
    assert "garrison_http_request_duration_seconds_bucket" in text
    status, audit = daemon.request("GET", "/v1/garrison/audit")
    assert audit["chain_intact"] and any(e["action"] == "keys.revoke" for e in audit["data"])
    for secret in daemon.keys.values():
        assert secret not in daemon.log()
    assert created["key"] not in daemon.log()


def test_audit_limit_gives_the_latest_entries_like_the_cli(daemon: Daemon) -> None:
    for n in range(5):
        run_cli(daemon.state_dir, "keys", "create", "--role", "read", "--name", f"audit-{n}", env=daemon.env)
    status, everything = daemon.request("GET", "/v1/garrison/audit?limit=10000")
    seqs = [e["seq"] for e in everything["data"]]
    assert status == 200 and seqs == sorted(seqs) and len(seqs) >= 6
    status, latest = daemon.request("GET", "/v1/garrison/audit?limit=3")
    assert status == 200 and latest["chain_intact"]
    assert [e["seq"] for e in latest["data"]] == seqs[-3:]  # newest last, as `garrison audit` prints them
    assert latest["data"][-1]["detail"] == everything["data"][-1]["detail"]
    shown = run_cli(daemon.state_dir, "audit", "--limit", "3", env=daemon.env).stdout.splitlines()
    assert [int(line.split()[0]) for line in shown[:3]] == seqs[-3:]
    status, page = daemon.request("GET", f"/v1/garrison/audit?after={seqs[0]}&limit=2")  # paging forward
    assert [e["seq"] for e in page["data"]] == seqs[1:3]
