"""llama.cpp's own server tests against Garrison, with only their harness adapted (issue 15's acceptance).

Not a test of ours. The llama-cpp-python sdist that install.sh caches vendors llama.cpp's server test
suite (vendor/llama.cpp/tools/server/tests: unit/test_*.py and the harness, utils.py, whose
`ServerProcess` starts llama-server on a model it downloads). This script extracts that folder at run
time (nothing is downloaded), appends an adapter to utils.py (HARNESS below) and runs the OpenAI-facing
test files with pytest:

- `ServerProcess.start` starts a Garrison daemon (one per distinct configuration, kept for the run)
  with an admin key and one of our tiny models (the tiny Llama GGUF for generation, the tiny Qwen3
  tool caller for the tool-call tests, the tiny BERT as ONNX for embeddings), imported under the
  preset's alias and the model names the tests give the openai client; llama-server's options become
  import settings where Garrison has them (`--ctx-size`/`--parallel` -> `--ctx` per slot and
  `--parallel`), and llama-server's acceptance of fields it does not know -> `allow_unknown_fields`;
  the others (server-wide `--temp`, `--seed`, `--n-predict`, `--pooling`, `--no-jinja`,
  `--chat-template`, `--context-shift`) have no Garrison setting and are harness limits.
- Requests get the key, llama-server's unprefixed OpenAI paths (`/chat/completions`) their `/v1`, and
  a body without a model (llama-server serves its one model under any name) the preset's alias;
  `openai.OpenAI(api_key="dummy")` in a test is given the key.
- `ServerPreset.load_all` (the model download) does nothing; `wget` is a stub that refuses.

Every failure is then classified by the table CLASSES: (a) an OpenAI-API incompatibility in Garrison,
(b) a llama-server-only feature or endpoint, (c) an assertion on a specific model's text, token counts
or values that a tiny model cannot meet, (d) a harness limit. A failure no row matches is reported as
"unclassified" (to be looked at as a possible (a)).

    .venv/bin/python bench/llama_server_tests.py [-k EXPR] [FILE ...]

Writes bench/out/llama_server_tests.{json,md}; the work folder is bench/out/llama_server_tests/.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "out"
WORK = OUT / "llama_server_tests"
SDIST = Path.home() / ".cache" / "garrison" / "wheels" / "llama_cpp_python-0.3.36.tar.gz"
INNER = "vendor/llama.cpp/tools/server/tests/"
FILES = ("test_chat_completion.py", "test_completion.py", "test_embedding.py", "test_compat_oai_responses.py",
         "test_ctx_shift.py", "test_tool_call.py")
PER_FILE_TIMEOUT_S = 1800

# The adapter appended to the suite's utils.py: it runs in utils' own namespace.
HARNESS = r'''

# ---- Garrison adapter (bench/llama_server_tests.py): only the harness changes ----------------------
import atexit as _atexit
import shutil
import json as _json
import signal as _signal
import socket as _socket
import urllib.request as _urlreq
import openai as _openai

_G = _json.loads(os.environ["GARRISON_LST"])
_POOL = {}
_OPENAI_PATHS = ("/chat/completions", "/completions", "/embeddings", "/responses", "/models")


def _free_port():
    with _socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kind(self):
    return "embed" if (self.server_embeddings or self.server_reranking) else _G["generate_kind"]


def _settings(self):
    slots = self.n_slots or 4  # llama-server's default
    ctx = (self.n_ctx // slots) if self.n_ctx else None  # llama-server's --ctx-size is shared by the slots
    return (_kind(self), ctx, slots)


def _cli(env, *args):
    proc = subprocess.run([_G["python"], "-m", "garrison.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"garrison {' '.join(args)}: {proc.stderr}")
    return proc.stdout.strip()


def _daemon(settings):
    if settings in _POOL:
        return _POOL[settings]
    kind, ctx, slots = settings
    root = os.path.join(_G["work"], "daemons", "-".join(str(s) for s in settings))
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GARRISON_")}
    env.update({"GARRISON_STATE_DIR": os.path.join(root, "state"), "GARRISON_CONFIG": "/dev/null",
                "XDG_CONFIG_HOME": os.path.join(root, "xdg"), "PYTHONUNBUFFERED": "1",
                # llama-server takes (and ignores) fields it does not know; Garrison's setting for that
                "GARRISON_ALLOW_UNKNOWN_FIELDS": "true"})
    extra = [] if kind == "embed" else ["--parallel", str(slots)] + (["--ctx", str(ctx)] if ctx else [])
    for name in _G["names"]:
        _cli(env, "models", "import", _G["models"][kind], "--name", name, *extra)
    key = _cli(env, "keys", "create", "--role", "admin")
    port = _free_port()
    log = open(os.path.join(root, "daemon.log"), "ab")
    proc = subprocess.Popen([_G["python"], "-m", "garrison.cli", "serve", "--listen", f"127.0.0.1:{port}"],
                            env=env, stdout=log, stderr=log)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            with _urlreq.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"garrison serve exited {proc.returncode}")
            time.sleep(0.05)
    _POOL[settings] = (proc, port, key)
    return _POOL[settings]


@_atexit.register
def _stop_all():
    for proc, _, _ in _POOL.values():
        proc.send_signal(_signal.SIGTERM)
    for proc, _, _ in _POOL.values():
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _start(self, timeout_seconds=DEFAULT_HTTP_TIMEOUT):
    _, port, key = _daemon(_settings(self))
    self.server_port, self._garrison_key = port, key
    self.ready = True
    server_instances.add(self)


def _stop(self):
    server_instances.discard(self)  # the daemon stays up for the next test of the same configuration


def _path(path):
    return "/v1" + path if path.startswith(_OPENAI_PATHS) else path


def _headers(self, headers):
    headers = dict(headers or {})
    if not headers.get("Authorization"):
        headers["Authorization"] = f"Bearer {getattr(self, '_garrison_key', '')}"
    return headers


def _body(data):
    if isinstance(data, dict) and data.get("model") not in _G["names"]:
        data = {**data, "model": _G["names"][0]}  # llama-server serves its one model under any name
    return data


_make_request = ServerProcess.make_request
_make_stream_request = ServerProcess.make_stream_request


def _request(self, method, path, data=None, headers=None, timeout=DEFAULT_REQUEST_TIMEOUT, host=None):
    return _make_request(self, method, _path(path), _body(data), _headers(self, headers), timeout, host)


def _stream_request(self, method, path, data=None, headers=None, host=None):
    return _make_stream_request(self, method, _path(path), _body(data), _headers(self, headers), host)


ServerProcess.start = _start
ServerProcess.stop = _stop
ServerProcess.make_request = _request
ServerProcess.make_stream_request = _stream_request
ServerPreset.load_all = staticmethod(lambda: None)


class OpenAI(_openai.OpenAI):
    """The tests' `OpenAI(api_key="dummy", ...)`, given the daemon's key (`from utils import *` brings it in)."""

    def __init__(self, *args, **kwargs):
        pool = [key for _, _, key in _POOL.values()]
        port = str(kwargs.get("base_url", "")).rsplit(":", 1)[-1].split("/")[0]
        keys = [key for _, p, key in _POOL.values() if str(p) == port] or pool
        kwargs["api_key"] = keys[0] if keys else kwargs.get("api_key")
        kwargs.setdefault("max_retries", 0)
        super().__init__(*args, **kwargs)
'''

WGET_STUB = '''"""No downloads in Garrison's run of llama.cpp's server tests."""


def download(url, out=None):
    raise RuntimeError(f"no network: {url} is not downloaded (Garrison's harness)")
'''


@dataclass(frozen=True)
class Rule:
    """A failure's class: the test id and the failure text are matched by these patterns (None: any)."""

    cls: str  # a, b, c, d
    test: str | None
    message: str | None
    why: str


CLASS_NAMES = {"a": "OpenAI-API incompatibility in Garrison", "b": "llama-server-only feature or endpoint",
               "c": "assertion on a specific model's text or numbers", "d": "harness limit"}

# First match wins. `test` matches "FILE::NAME[PARAMS]"; each row says what llama-server does that
# OpenAI does not (b), what only the test's own model produces (c), or what the harness cannot map (d).
CLASSES: tuple[Rule, ...] = (
    Rule("b", None, r"'garrison'\.startswith|startswith\('b'\)",
         "system_fingerprint as llama-server's build number ('b1234'); OpenAI's is an opaque string"),
    Rule("b", r"timings_per_token|test_return_progress|llama_telemetry", None,
         "llama-server's timings and prompt-progress extensions"),
    Rule("b", r"test_chat_template\b|test_chat_template_assistant_prefill|test_verbose_debug", None,
         "llama-server's `__verbose` debug field (the rendered prompt in the response)"),
    Rule("b", r"test_apply_chat_template|test_chat_completions_token_count|test_cancel_request|"
              r"test_completion_prompt_cache", None,
         "a llama-server-only endpoint (/apply-template, /slots, native /completion)"),
    Rule("b", r"test_completion\.py|test_ctx_shift\.py", r"404|No route POST /completion",
         "llama-server's native /completion endpoint (llama.cpp's own fields: n_predict, timings, truncated)"),
    Rule("b", r"test_completion\.py::test_(consistent|different)_result", r"KeyError: 'content'",
         "llama-server's native /completion response (`content`)"),
    Rule("b", r"test_chat_completion_stream|test_logprobs_stream", r"'' is None",
         "the first streamed delta's content: OpenAI sends \"\" with the role, llama-server null"),
    Rule("b", r"test_context_size_exceeded", r"exceed_context_size_error",
         "llama-server's own error type; Garrison answers as OpenAI (invalid_request_error, code "
         "context_length_exceeded)"),
    Rule("b", r"test_invalid_chat_completion_req\[messages7\]", None,
         "two assistant turns in a row: OpenAI accepts them, llama-server refuses"),
    Rule("b", r"test_embedding_mixed_input\[-False\]", None,
         "an empty string input: OpenAI refuses it (400), llama-server embeds it"),
    Rule("b", r"test_embedding_mixed_input|test_embedding_content_text_same_as_string", None,
         "llama-server's prompt forms: strings mixed with token ids in one input, {prompt_string}/{content} "
         "objects"),
    Rule("b", r"test_embedding_pooling_none\b", None, "llama-server's non-OpenAI /embeddings output for pooling none"),
    Rule("b", r"test_embedding_error_prompt_too_long", r"too large",
         "llama-server's error wording; Garrison answers 400 context_length_exceeded, as OpenAI"),
    Rule("b", r"continue_final_message", None, "vLLM's continue_final_message extension"),
    Rule("b", r"test_completion_with_json_schema", None, "llama-server's top-level `json_schema` field"),
    Rule("b", r"test_completion_stream_with_openai_library_stops", r"max_tokens",
         "max_tokens beyond the context: OpenAI refuses (400), llama-server clamps"),
    Rule("b", r"test_chat_completion\.py::test_logit_bias", None,
         "llama-server's /tokenize endpoint (logit_bias itself is tested with the openai client in our suite)"),
    Rule("b", None, r"Expected non empty content delta",
         "the harness refuses an empty content delta; OpenAI's first delta carries the role with content \"\""),
    Rule("c", r"test_chat_completions_multiple_choices", r"'stop' == 'length'",
         "both choices came back (n=2); one ended on the tiny model's end-of-text within 8 tokens"),
    Rule("d", r"test_embedding_pooling_none_oai", None,
         "llama-server's --pooling none: Garrison takes pooling from the model's configuration"),
    Rule("c", r"test_chat_completion_cached_tokens|test_embedding_usage", None,
         "token counts of llama.cpp's stories260K / bge-small tokenizers"),
    Rule("c", None, r"match_regex", "text of llama.cpp's stories260K model (a tiny model of ours says other things)"),
    Rule("c", r"test_compat_oai_responses\.py::test_responses_with_openai_library", None,
         "text of llama.cpp's stories260K model"),
    Rule("d", None, r"no network|is not downloaded", "a model the test downloads (none is downloaded here)"),
)


def classify(test: str, message: str) -> tuple[str, str]:
    for rule in CLASSES:
        if (rule.test is None or re.search(rule.test, test)) and (rule.message is None or re.search(
                rule.message, message, re.S)):
            return rule.cls, rule.why
    return "unclassified", "no rule matches: look at it as a possible OpenAI incompatibility"


def _extract() -> Path:
    if not SDIST.is_file():
        raise SystemExit(f"{SDIST} is missing: ./install.sh caches it")
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    with tarfile.open(SDIST) as tar:
        members = [m for m in tar.getmembers() if INNER in m.name and m.isfile()]
        for member in members:
            member.name = member.name.split(INNER, 1)[1]
            tar.extract(member, WORK / "tests", filter="data")
    tests = WORK / "tests"
    (tests / "utils.py").write_text((tests / "utils.py").read_text() + HARNESS)
    (tests / "wget.py").write_text(WGET_STUB)
    return tests


def _models() -> dict[str, str]:
    """Our tiny models, built by the test fixtures' builders (cached; nothing downloaded)."""
    from garrison.converters.hf_to_gguf import ensure_gguf
    from garrison.converters.hf_to_onnx import export_hf_to_onnx
    from garrison.training.tiny_models import TOOL_CALLER_CHAT, TOOL_CALLER_TOOLS, build_tiny_real, ensure_model

    root = Path(os.environ.get("GARRISON_TEST_CACHE") or Path.home() / ".cache" / "garrison" / "test-models")
    llama = ensure_gguf(ensure_model("tiny-llama", root), "f16")
    qwen_tokenizer = root / "tokenizers" / "qwen3"
    caller = ensure_gguf(ensure_model("tiny-qwen3-tool-caller", root, lambda out: build_tiny_real(
        out, qwen_tokenizer, "qwen3", teach=TOOL_CALLER_CHAT, tools=TOOL_CALLER_TOOLS, steps=80)), "f16")
    onnx = WORK / "bert-onnx"
    bert = export_hf_to_onnx(ensure_model("tiny-bert", root), onnx).path
    return {"generate": str(llama), "tools": str(caller), "embed": str(bert)}


def _run_file(tests: Path, name: str, models: dict[str, str], keyword: str | None) -> list[dict[str, Any]]:
    report = WORK / f"{name}.xml"
    config = {"python": sys.executable, "work": str(WORK), "models": models,
              "generate_kind": "tools" if name == "test_tool_call.py" else "generate",
              "names": ["tinyllama-2", "gpt-3.5-turbo-instruct", "gpt-3.5-turbo", "davinci-002", "gpt-4.1",
                        "text-embedding-3-small"]}
    env = {**os.environ, "GARRISON_LST": json.dumps(config), "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "pytest", f"unit/{name}", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
               f"--junitxml={report}", "-rN",
               "-m", "not slow",  # as the suite's own tests.sh runs by default
               *(["-k", keyword] if keyword else [])]
    started = time.monotonic()
    try:
        subprocess.run(command, cwd=tests, env=env, timeout=PER_FILE_TIMEOUT_S, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return [{"file": name, "test": name, "outcome": "failed", "class": "d",
                 "why": f"the file did not finish in {PER_FILE_TIMEOUT_S} s", "message": ""}]
    print(f"{name}: {time.monotonic() - started:.0f} s", flush=True)
    return _read_report(name, report)


def _read_report(name: str, report: Path) -> list[dict[str, Any]]:
    if not report.exists():
        return [{"file": name, "test": name, "outcome": "failed", "class": "d", "why": "pytest wrote no report",
                 "message": ""}]
    rows = []
    for case in ET.parse(report).getroot().iter("testcase"):
        test = f"{name}::{case.get('name')}"
        failure = case.find("failure")
        if failure is None:
            failure = case.find("error")
        skipped = case.find("skipped")
        if failure is not None:
            message = (failure.get("message") or "") + "\n" + (failure.text or "")
            cls, why = classify(test, message)
            rows.append({"file": name, "test": test, "outcome": "failed", "class": cls, "why": why,
                         "message": (failure.get("message") or "")[:400]})
        elif skipped is not None:
            rows.append({"file": name, "test": test, "outcome": "skipped", "message": skipped.get("message", "")[:200]})
        else:
            rows.append({"file": name, "test": test, "outcome": "passed"})
    return rows


def _markdown(rows: list[dict[str, Any]], counts: dict[str, Any]) -> str:
    lines = ["# llama.cpp's server tests against Garrison", "",
             "Generated by `bench/llama_server_tests.py` (llama.cpp's tests from the cached llama-cpp-python "
             "0.3.36 sdist, only the harness adapted).", "",
             f"Passed {counts['passed']}, failed {counts['failed']}, skipped {counts['skipped']}.", "",
             "| class | meaning | failures |", "|---|---|---|"]
    for cls in ("a", "b", "c", "d", "unclassified"):
        lines.append(f"| {cls} | {CLASS_NAMES.get(cls, 'not yet classified')} | {counts['classes'].get(cls, 0)} |")
    lines += ["", "| test | outcome | class | why |", "|---|---|---|---|"]
    for row in rows:
        lines.append(f"| `{row['test']}` | {row['outcome']} | {row.get('class', '')} | {row.get('why', '')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", default=list(FILES))
    parser.add_argument("-k", dest="keyword")
    parser.add_argument("--classify-only", action="store_true",
                        help="classify the last run's reports again (after a change to CLASSES)")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    if args.classify_only:
        for name in args.files:
            if (WORK / f"{name}.xml").exists():
                rows += _read_report(name, WORK / f"{name}.xml")
    else:
        tests = _extract()
        models = _models()
        for name in args.files:
            if (tests / "unit" / name).exists():
                rows += _run_file(tests, name, models, args.keyword)
    outcomes = Counter(r["outcome"] for r in rows)
    counts = {"passed": outcomes["passed"], "failed": outcomes["failed"], "skipped": outcomes["skipped"],
              "classes": dict(Counter(r["class"] for r in rows if r["outcome"] == "failed"))}
    OUT.mkdir(exist_ok=True)
    (OUT / "llama_server_tests.json").write_text(json.dumps({"counts": counts, "tests": rows}, indent=1) + "\n")
    (OUT / "llama_server_tests.md").write_text(_markdown(rows, counts))
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
