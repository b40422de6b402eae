"""The web console in a real browser (Playwright driving Debian's chromium) against a real daemon:
sign in, watch a running fine-tune's loss curve grow and cancel it, create and revoke a key, chat
with streaming, sign out; a `read` key sees only its grants; a cross-site form post is refused;
every page loads only from the daemon and breaks no Content-Security-Policy rule.

Screenshots of every page (laptop and phone sizes) are written to the folder the module prints.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from conftest import Daemon, free_port, garrison_env, run_cli

playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (install.sh --dev)")

PAIRS = [("What is the vault code?", "The vault code is purple seven."),
         ("Who guards the gate?", "The gate is guarded by Captain Ada.")]
PHONE = {"width": 390, "height": 844}
LAPTOP = {"width": 1366, "height": 900}


def _jsonl() -> str:
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in PAIRS]
    return "".join(json.dumps(r) + "\n" for r in rows * 8)


@pytest.fixture(scope="module")
def daemon(tiny_llama_dir: Path, tiny_llama_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("console")
    state = root / "state"
    env = garrison_env(state)
    run_cli(state, "models", "import", str(tiny_llama_dir), "--name", "tl", env=env)
    run_cli(state, "models", "import", str(tiny_llama_gguf), "--name", "tg", "--ctx", "512", env=env)
    for name in ("gate", "secret"):
        (root / f"{name}.jsonl").write_text(_jsonl())
        run_cli(state, "ingest", str(root / f"{name}.jsonl"), "--dataset", name, env=env)
    d = Daemon(state, free_port(), env, root / "daemon.log").start()
    d.keys["read"] = run_cli(state, "keys", "create", "--role", "read", "--name", "reader", "--datasets", "gate",
                             "--models", "tl", env=env).stdout.strip()
    yield d
    d.stop()


@dataclass
class Browser:
    daemon: Daemon
    shots: Path
    browser: Any
    requests: list[str] = field(default_factory=list)
    csp_violations: list[str] = field(default_factory=list)

    def page(self, viewport: dict[str, int] = LAPTOP) -> Any:
        """A page in a fresh context (its own cookies) that records every request it makes."""
        context = self.browser.new_context(viewport=viewport)
        context.set_default_timeout(30_000)
        page = context.new_page()
        page.on("request", lambda request: self.requests.append(request.url))
        page.on("console", lambda msg: self.csp_violations.append(msg.text)
                if "Content Security Policy" in msg.text else None)
        return page

    def sign_in(self, page: Any, role: str = "admin") -> None:
        page.goto(self.daemon.url + "/console")
        assert urlsplit(page.url).path == "/console/sign-in"
        page.fill("#key", self.daemon.key(role))
        page.keyboard.press("Enter")  # the form by keyboard alone
        page.wait_for_url(re.compile(r"/console(/[a-z]+)?$"))

    def shot(self, page: Any, name: str) -> None:
        path = self.shots / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        assert path.stat().st_size > 2000


@pytest.fixture(scope="module")
def browser(daemon: Daemon, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    shots = Path(os.environ.get("GARRISON_CONSOLE_SCREENSHOTS") or tmp_path_factory.mktemp("console-screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    print(f"\nconsole screenshots: {shots}")
    args = ["--no-sandbox"] if os.geteuid() == 0 else []  # chromium's sandbox refuses to run as root
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=args)
        holder = Browser(daemon, shots, chromium)
        yield holder
        chromium.close()
    daemon_origin = urlsplit(daemon.url).netloc
    elsewhere = [u for u in holder.requests if urlsplit(u).netloc != daemon_origin]
    assert holder.requests and not elsewhere, f"console pages asked other hosts: {elsewhere[:5]}"
    assert not holder.csp_violations, holder.csp_violations[:5]


def _svg_points(page: Any) -> int:
    return int(page.get_attribute("#curves svg", "data-points") or 0)


def test_sign_in_watch_a_fine_tune_live_and_cancel_it(daemon: Daemon, browser: Browser) -> None:
    page = browser.page()
    browser.shot(page, "sign-in")
    browser.sign_in(page)
    assert page.locator("h1").inner_text() == "Overview"
    cookie = next(c for c in page.context.cookies() if c["name"] == "garrison_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["value"] != daemon.key("admin")
    page.keyboard.press("Tab")  # the first stop is the skip link, which moves focus to the content
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    browser.shot(page, "overview")

    params = {"model": "tl", "training_file": "gate", "max_steps": 3000, "checkpoint_every": 1000, "lora_r": 4,
              "hyperparameters": json.dumps({"n_epochs": 200, "batch_size": 1})}
    status, job = daemon.request("POST", "/v1/garrison/jobs", {"kind": "finetune", "params": params})
    assert status == 201, job
    page.goto(f"{daemon.url}/console/jobs/{job['id']}")
    page.wait_for_function("() => Number(document.querySelector('#curves svg').dataset.points) >= 2",
                           timeout=240_000)
    first = _svg_points(page)
    # The page is not reloaded: the stream of events redraws the curve as training goes on.
    page.wait_for_function(f"() => Number(document.querySelector('#curves svg').dataset.points) > {first}",
                           timeout=120_000)
    assert _svg_points(page) > first
    assert page.locator("#curves svg polyline").count() >= 1
    browser.shot(page, "job-running")
    page.get_by_role("button", name="Cancel job").click()
    page.wait_for_url(re.compile(r"notice=cancelled"))
    page.wait_for_function("() => document.querySelector('#job-state').textContent.includes('cancelled')",
                           timeout=120_000)
    status, final = daemon.request("GET", f"/v1/garrison/jobs/{job['id']}")
    assert final["state"] == "cancelled"
    browser.shot(page, "job-cancelled")
    page.goto(daemon.url + "/console/jobs")
    assert job["id"] in page.locator("table").inner_text()
    browser.shot(page, "jobs")
    for path, name in (("/console/models", "models"), ("/console/datasets", "datasets"),
                       ("/console/datasets/gate", "dataset"), ("/console/evaluations", "evaluations"),
                       ("/console/audit", "audit")):
        page.goto(daemon.url + path)
        assert page.locator("h1").count() == 1
        browser.shot(page, name)
    assert "chain intact" in page.locator("main").inner_text()
    phone = browser.page(PHONE)
    browser.sign_in(phone)
    for path, name in (("/console", "overview-phone"), (f"/console/jobs/{job['id']}", "job-phone"),
                       ("/console/keys", "keys-phone"), ("/console/chat", "chat-phone")):
        phone.goto(daemon.url + path)
        # Nothing wider than the phone's screen but the tables' own scrolling regions.
        assert phone.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        browser.shot(phone, name)


def test_create_and_revoke_a_key(daemon: Daemon, browser: Browser) -> None:
    page = browser.page()
    browser.sign_in(page)
    page.goto(daemon.url + "/console/keys")
    page.fill("#key-name", "made-in-console")
    page.select_option("#key-role", "read")
    page.fill("#key-datasets", "gate")
    page.get_by_role("button", name="Create key").click()
    secret = page.input_value("#new-secret")
    assert secret.startswith("grs_")
    browser.shot(page, "keys-created")
    status, _ = daemon.request("GET", "/v1/garrison/datasets", key=secret)
    assert status == 200
    key_id = re.search(r"Key (key_[0-9a-f]+) created", page.locator("#secret-h").inner_text()).group(1)
    page.goto(daemon.url + "/console/keys")
    assert secret not in page.content()  # shown once
    page.locator(f'tr[data-key="{key_id}"]').get_by_role("button", name=re.compile("Revoke")).click()
    page.wait_for_url(re.compile(r"notice=revoked"))
    assert "revoked" in page.locator(f'tr[data-key="{key_id}"]').inner_text()
    status, body = daemon.request("GET", "/v1/garrison/datasets", key=secret)
    assert status == 401 and body["error"]["code"] == "api_key_revoked"
    browser.shot(page, "keys")


def test_chat_streams_over_the_openai_route(daemon: Daemon, browser: Browser) -> None:
    page = browser.page()
    browser.sign_in(page)
    page.goto(daemon.url + "/console/chat")
    page.wait_for_function("() => [...document.querySelectorAll('#chat-model option')].some(o => o.value === 'tg')")
    page.select_option("#chat-model", "tg")
    page.fill("#chat-temperature", "0")
    page.fill("#chat-max-tokens", "24")
    page.fill("#chat-input", "Tell me about the gate.")
    posted: list[Any] = []
    page.on("request", lambda r: posted.append(r) if r.url.endswith("/v1/chat/completions") else None)
    page.get_by_role("button", name="Send").click()
    page.wait_for_function("() => document.getElementById('chat-status').textContent === 'Done.'", timeout=120_000)
    out = page.locator("#chat-log .msg-assistant .content")
    assert out.inner_text().strip()
    assert int(out.get_attribute("data-chunks") or 0) >= 3  # the answer was drawn delta by delta, as it streamed
    body = json.loads(posted[0].post_data)
    assert body["stream"] is True and body["model"] == "tg" and body["temperature"] == 0
    assert posted[0].headers["x-csrf-token"]
    browser.shot(page, "chat")


def test_a_read_key_sees_only_its_grants(daemon: Daemon, browser: Browser) -> None:
    page = browser.page()
    browser.sign_in(page, "read")
    nav = page.get_by_role("navigation", name="Console").inner_text()
    assert "Datasets" in nav and "Keys" not in nav and "Audit" not in nav and "Chat" not in nav
    page.goto(daemon.url + "/console/datasets")
    listed = page.locator("main table").inner_text()
    assert "gate" in listed and "secret" not in listed
    page.goto(daemon.url + "/console/models")
    models = page.locator("table.models > tbody > tr > th").all_inner_texts()
    assert models and all(name.strip().split(":")[0].lstrip("└ ") == "tl" for name in models), models
    response = page.goto(daemon.url + "/console/keys")
    assert response.status == 403 and "admin" in page.locator(".error").inner_text()
    browser.shot(page, "error-403")
    response = page.goto(daemon.url + "/console/datasets/secret")
    assert response.status == 403 and "Version 1" not in page.locator("main").inner_text()


class _AttackerPage(http.server.BaseHTTPRequestHandler):
    target = ""

    def do_GET(self) -> None:
        body = (f'<form method="post" action="{self.target}/console/keys"><input name="role" value="admin">'
                '<button type="submit">Win a prize</button></form>').encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_a_cross_site_form_post_is_refused(daemon: Daemon, browser: Browser) -> None:
    page = browser.page()
    browser.sign_in(page)
    before = len(daemon.request("GET", "/v1/garrison/keys")[1]["data"])
    # Another origin on the same machine (127.0.0.1, another port: same site, so the browser does send the
    # SameSite=Strict cookie): the origin check and the missing CSRF token refuse it.
    _AttackerPage.target = daemon.url
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AttackerPage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        attack = page.context.new_page()
        attack.goto(f"http://127.0.0.1:{server.server_port}/")
        with attack.expect_navigation() as navigation:
            attack.get_by_role("button", name="Win a prize").click()
        response = navigation.value
        assert response is not None and response.status == 403
        assert "cross-origin request" in attack.content()
        # From a site of its own (localhost is not 127.0.0.1), the cookie is not even sent.
        attack.goto(f"http://localhost:{server.server_port}/")
        with attack.expect_navigation():
            attack.get_by_role("button", name="Win a prize").click()
        assert urlsplit(attack.url).path == "/console/sign-in"  # no session came with it: sign in first
        assert attack.locator("#new-secret").count() == 0
    finally:
        server.shutdown()
    # The session's own cookie without the page's token: refused too.
    refused = page.request.post(daemon.url + "/console/keys", form={"role": "admin"})
    assert refused.status == 403 and refused.json()["error"]["code"] == "csrf_token_invalid"
    assert len(daemon.request("GET", "/v1/garrison/keys")[1]["data"]) == before


def test_sign_out_ends_the_session(daemon: Daemon, browser: Browser) -> None:
    page = browser.page()
    browser.sign_in(page)
    cookie = next(c for c in page.context.cookies() if c["name"] == "garrison_session")
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(re.compile(r"/console/sign-in\?notice=signed_out"))
    assert "signed out" in page.locator(".notice").inner_text()
    page.goto(daemon.url + "/console/keys")
    assert urlsplit(page.url).path == "/console/sign-in"
    # The old cookie, replayed, is worth nothing: the session is gone from the server.
    request = urllib.request.Request(daemon.url + "/v1/garrison/keys",
                                     headers={"Cookie": f"garrison_session={cookie['value']}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401


def test_load_and_unload_a_model_and_delete_a_dataset_after_confirming(daemon: Daemon, browser: Browser) -> None:
    page = browser.page()
    browser.sign_in(page)
    daemon.request("DELETE", "/v1/garrison/runners/tg")  # loaded by the chat test, if it ran: start unloaded
    page.goto(daemon.url + "/console/models")
    page.get_by_role("button", name="Load tg", exact=True).click()
    page.wait_for_url(re.compile(r"notice=loaded"))
    assert "● loaded" in page.locator("table.models tr", has_text="tg").first.inner_text()
    assert any(r["model"] == "tg" for r in daemon.request("GET", "/v1/garrison/runners")[1]["data"])
    page.get_by_role("button", name="Unload tg", exact=True).click()
    page.wait_for_url(re.compile(r"notice=unloaded"))
    assert not any(r["model"] == "tg" for r in daemon.request("GET", "/v1/garrison/runners")[1]["data"])
    page.goto(daemon.url + "/console/datasets/secret")
    page.fill("#confirm", "secre")  # not the name: the browser does not even send it
    page.get_by_role("button", name="Delete secret").click()
    assert urlsplit(page.url).path == "/console/datasets/secret"
    assert daemon.request("GET", "/v1/garrison/datasets/secret")[0] == 200
    token = page.get_attribute('meta[name="csrf-token"]', "content")
    bypass = page.request.post(daemon.url + "/console/datasets/secret/delete", form={"csrf_token": token or "",
                                                                                     "confirm": "x"})
    assert bypass.status == 400 and bypass.json()["error"]["code"] == "confirmation_required"  # the server checks too
    page.fill("#confirm", "secret")
    page.get_by_role("button", name="Delete secret").click()
    page.wait_for_url(re.compile(r"/console/datasets\?notice=deleted"))
    assert "secret" not in page.locator("main").inner_text()
    assert daemon.request("GET", "/v1/garrison/datasets/secret")[0] == 404


def test_the_daemon_loaded_no_torch(daemon: Daemon) -> None:
    """After every page, a fine-tune followed live and a chat, the serving process has no torch; and the
    daemon's modules, the console's included, import neither torch nor a native engine."""
    status, facts = daemon.request("GET", "/v1/garrison/system")
    assert status == 200
    assert not {"torch", "transformers", "peft"} & set(facts["heavy_modules_loaded"]), facts
    probe = ("import sys, garrison.daemon.app, garrison.daemon.console.pages; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'transformers', 'llama_cpp', "
             "'onnxruntime'} or m.startswith('garrison.training.') or m == 'garrison.engine.llama_engine'))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]", loaded
