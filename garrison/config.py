"""Garrison's configuration: one typed, documented table of settings.

Each setting is one row of `SETTINGS`; the TOML loader, the `GARRISON_<KEY>`
environment overrides, the CLI flags and `garrison config --help` all read that table,
so a new setting is one row. Precedence, lowest first: built-in default, the TOML file,
the environment, command-line flags. Every value is validated at start; a bad one is a
`ConfigError` (exit code 2) naming the key and where the value came from.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

from garrison.errors import ConfigError

SYSTEM_CONFIG = Path("/etc/garrison/garrison.toml")
ENV_PREFIX = "GARRISON_"
DEFAULT_PORT = 8477


def _default_state_dir(env: Mapping[str, str]) -> str:
    # systemd's StateDirectory= sets $STATE_DIRECTORY; otherwise a private folder in
    # the user's home, so a developer install never needs root.
    if env.get("STATE_DIRECTORY"):
        return env["STATE_DIRECTORY"].split(":")[0]
    home = env.get("HOME") or str(Path.home())
    base = env.get("XDG_DATA_HOME") or str(Path(home) / ".local" / "share")
    return str(Path(base) / "garrison")


def _parse_listen(value: Any) -> str:
    text = str(value).strip()
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError("expected HOST:PORT, for example 127.0.0.1:8477")
    if not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise ValueError(f"port {port!r} is not a number from 0 to 65535")
    return f"{host}:{int(port)}"


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise ValueError("expected true or false")


def _bounded(kind: Callable[[Any], Any], low: float, high: float) -> Callable[[Any], Any]:
    def parse(value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("expected a number")
        number = kind(value)
        if not low <= number <= high:
            raise ValueError(f"must be between {low:g} and {high:g}")
        return number

    return parse


def _choice(*allowed: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = str(value).strip().lower()
        if text not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return text

    return parse


def _path(value: Any) -> str:
    text = str(value).strip()
    if not text:
        raise ValueError("must not be empty")
    return str(Path(text).expanduser())


def _optional_path(value: Any) -> str:
    text = str(value).strip()
    return str(Path(text).expanduser()) if text else ""


def _origins(value: Any) -> tuple[str, ...]:
    """Browser origins (scheme://host[:port]) allowed by CORS: a TOML list, or a comma-separated string."""
    items = value if isinstance(value, list | tuple) else str(value).replace(",", " ").split()
    out: list[str] = []
    for item in items:
        origin = str(item).strip().rstrip("/").lower()
        if origin == "*":
            out.append(origin)
            continue
        scheme, sep, rest = origin.partition("://")
        if scheme not in ("http", "https") or not sep or not rest or any(c in rest for c in "/?#@ "):
            raise ValueError(f"{item!r} is not an origin such as https://app.example.com or http://localhost:3000")
        out.append(origin)
    return tuple(dict.fromkeys(out))


class Reload(StrEnum):
    """What SIGHUP does with a changed setting (garrison.daemon.lifecycle applies each one)."""

    LIVE = "live"              # applied at once: the next request, connection, job or poll uses it
    NEXT_LOAD = "next load"    # applied to models loaded from then on; a loaded model keeps its own
    RESTART = "restart"        # kept as it was, and logged as config.needs_restart


@dataclass(frozen=True)
class Setting:
    key: str
    parse: Callable[[Any], Any]
    default: Callable[[Mapping[str, str]], Any]
    doc: str
    #: Required of every row: a setting nobody decided about is not silently "live" or "restart".
    reload: Reload
    #: Why a restart is needed, or what "live" means for this setting; shown in the docs.
    reload_note: str = ""


SETTINGS: tuple[Setting, ...] = (
    Setting("state_dir", _path, _default_state_dir,
            "Folder for the catalog, vault, models and inbox (systemd: StateDirectory).",
            Reload.RESTART, "the catalog, vault and daemon lock are opened at start"),
    Setting("listen", _parse_listen, lambda _env: f"127.0.0.1:{DEFAULT_PORT}",
            "HOST:PORT the daemon listens on; loopback by default.",
            Reload.RESTART, "the socket is bound at start"),
    Setting("log_level", _choice("debug", "info", "warning", "error"), lambda _env: "info",
            "Lowest level of log lines written to stderr.",
            Reload.LIVE),
    Setting("master_key_file", _optional_path, lambda _env: "",
            "Root-only file holding the master key; $CREDENTIALS_DIRECTORY/master.key wins.",
            Reload.RESTART,
            "the master key opens the identity and the data keys, read at start"),
    Setting("shutdown_grace_s", _bounded(float, 0, 3600), lambda _env: 20.0,
            "Seconds in-flight requests and workers get to finish after SIGTERM.",
            Reload.LIVE),
    Setting("max_request_mb", _bounded(float, 0.01, 1_048_576), lambda _env: 8.0,
            "Largest JSON request body accepted, in MiB (uploads stream separately).",
            Reload.LIVE, "from the next request"),
    Setting("job_concurrency", _bounded(int, 1, 64), lambda _env: 1,
            "Worker subprocesses the job runner runs at once.",
            Reload.LIVE),
    Setting("job_poll_s", _bounded(float, 0.01, 60), lambda _env: 0.25,
            "How often the job runner looks for queued jobs and cancellations.",
            Reload.LIVE),
    Setting("job_timeout_s", _bounded(float, 1, 30 * 86400), lambda _env: 86400.0,
            "Default wall-clock limit of one job attempt.",
            Reload.LIVE, "jobs submitted afterwards"),
    Setting("job_max_attempts", _bounded(int, 1, 100), lambda _env: 3,
            "Default attempts of a job before it is marked failed.",
            Reload.LIVE, "jobs submitted afterwards"),
    Setting("job_heartbeat_s", _bounded(float, 0.05, 600), lambda _env: 2.0,
            "How often a worker records that it is alive.",
            Reload.LIVE, "workers started afterwards"),
    Setting("job_stale_after_s", _bounded(float, 0.5, 86400), lambda _env: 30.0,
            "A running job whose heartbeat is older than this is orphaned.",
            Reload.LIVE),
    Setting("allow_remote", _parse_bool, lambda _env: False,
            "Allow listening on a non-loopback address (expose on the LAN); needs TLS (tls_cert_file) unless "
            "allow_plaintext_lan.",
            Reload.RESTART, "goes with listen"),
    Setting("max_connections", _bounded(int, 16, 1_000_000), lambda _env: 4096,
            "Client connections served at once (bounded by the file limit); beyond it a small reserve answers "
            "only /health and /ready, and further connections are closed at once.",
            Reload.LIVE,
            "new connections; at most the open-file limit found at start allows"),
    Setting("header_timeout_s", _bounded(float, 0.5, 3600), lambda _env: 15.0,
            "Seconds a connection gets to send a complete request head, after connecting and after each "
            "response (slow senders and idle keep-alive connections are dropped).",
            Reload.LIVE, "each deadline armed afterwards"),
    Setting("body_timeout_s", _bounded(float, 1, 86400), lambda _env: 60.0,
            "Seconds a JSON request body may take to arrive, and an upload's body (sealed dataset, "
            "/v1/files) may send nothing before it is dropped (408).",
            Reload.LIVE, "from the next request"),
    Setting("tls_cert_file", _optional_path, lambda _env: "",
            "PEM certificate (chain) the daemon serves HTTPS with; reloaded on SIGHUP "
            "(`garrison tls new-cert` makes a self-signed one).",
            Reload.LIVE,
            "a renewed certificate, for connections made afterwards; turning TLS on or off needs a "
            "restart"),
    Setting("tls_key_file", _optional_path, lambda _env: "",
            "PEM private key of tls_cert_file (empty: the key is in the certificate file).",
            Reload.LIVE, "with tls_cert_file"),
    Setting("allow_plaintext_lan", _parse_bool, lambda _env: False,
            "Serve plain HTTP on a non-loopback address (a trusted network or a TLS proxy in front).",
            Reload.RESTART, "goes with listen"),
    Setting("run_jobs", _parse_bool, lambda _env: True,
            "Whether `garrison serve` also runs the job runner (false when garrison-worker runs it).",
            Reload.RESTART, "the job runner starts with the daemon"),
    Setting("model_memory_mb", _bounded(float, 0, 16 * 1024 * 1024), lambda _env: 0.0,
            "Memory budget for loaded models in MiB; past it the least recently used idle model is "
            "unloaded (0: half of the machine's memory).",
            Reload.LIVE, "idle models beyond a smaller budget are unloaded at once"),
    Setting("model_keep_alive_s", _bounded(float, 0, 30 * 86400), lambda _env: 900.0,
            "A model unused this long is unloaded (0: keep loaded).",
            Reload.LIVE),
    Setting("model_queue", _bounded(int, 0, 100_000), lambda _env: 64,
            "Requests that may wait per model beyond its parallel slots; past it: 429 with Retry-After.",
            Reload.NEXT_LOAD,
            "a loaded model's runner keeps its queue until it is unloaded"),
    Setting("request_timeout_s", _bounded(float, 1, 86400), lambda _env: 600.0,
            "Deadline of one inference request, queued time included.",
            Reload.LIVE, "from the next request"),
    Setting("policy_file", _optional_path, lambda _env: "",
            "TOML file of the data policy (redaction actions, custom patterns, bad lines, retention); "
            "default: policy.toml in the state folder if present, else the built-in defaults.",
            Reload.LIVE,
            "the file is read again, whole, on every SIGHUP; a bad one is refused and the old policy "
            "kept"),
    Setting("max_upload_mb", _bounded(float, 1, 16 * 1024 * 1024), lambda _env: 65536.0,
            "Largest sealed upload accepted, in MiB (streamed, never held in memory).",
            Reload.LIVE, "from the next upload"),
    Setting("inference_threads", _bounded(int, 0, 1024), lambda _env: 0,
            "CPU threads per loaded model (0: all cores, at most 8).",
            Reload.NEXT_LOAD,
            "a loaded model's runner keeps its threads until it is unloaded"),
    Setting("cpu_repack", _choice("auto", "on", "off"), lambda _env: "auto",
            "llama.cpp's CPU weight repack (extra buffer types: AMX, AArch64 layouts). auto: used for a weight "
            "type once a throw-away probe decoded with it on this CPU and build; on: always (a CPU that faults "
            "crashes the model's runner, never the daemon); off: never. Also [engine] cpu_repack.",
            Reload.NEXT_LOAD,
            "a loaded model's weights keep their layout until it is unloaded"),
    Setting("master_key_keep_previous_days", _bounded(float, 0, 3650), lambda _env: 30.0,
            "Days the replaced master key (master.key.previous) is kept after a rotation, then deleted at the "
            "daemon's next start or the next `garrison keys` rotation command; 0 keeps it until "
            "`garrison keys rotate-master --finish`.",
            Reload.RESTART,
            "checked when the daemon starts; `garrison keys` rotation commands read it themselves"),
    Setting("runner_max_crashes", _bounded(int, 1, 1000), lambda _env: 3,
            "Crashes in a row after which a model's runner is no longer restarted and the model is failed.",
            Reload.LIVE),
    Setting("cors_origins", _origins, lambda _env: (),
            "Browser origins (https://host[:port]) whose pages may call the API (CORS); none by default. "
            "`*` allows any origin (keys still required; never with credentials).",
            Reload.LIVE, "from the next request"),
    Setting("allow_unknown_fields", _parse_bool, lambda _env: False,
            "Accept request fields the OpenAI routes do not know (default: 400 unknown_parameter naming "
            "them, as OpenAI answers).",
            Reload.LIVE, "from the next request"),
    Setting("audit_anchor_every", _bounded(int, 1, 1_000_000), lambda _env: 100,
            "The audit trail's head (sequence number and MAC) is written to the anchor file outside the "
            "catalog (and the systemd journal) at least every this many entries, and at daemon shutdown.",
            Reload.LIVE, "from the next audited change"),
    Setting("console_session_hours", _bounded(float, 0.05, 24 * 90), lambda _env: 12.0,
            "How long a web console sign-in lasts (/console): the session ends this many hours after sign-in, "
            "at sign-out, or when its key is revoked or expires, whichever comes first.",
            Reload.LIVE, "for sign-ins from then on; sessions already open keep their expiry"),
    Setting("responses_retention_days", _bounded(float, 0.001, 3650), lambda _env: 30.0,
            "How long /v1/responses keeps a stored response (`store`, for `previous_response_id` and "
            "GET /v1/responses/{id}); older ones are deleted and their keys destroyed (swept every minute).",
            Reload.LIVE, "for stored responses too, at the next read or sweep"),
)

SETTINGS_BY_KEY: dict[str, Setting] = {s.key: s for s in SETTINGS}


@dataclass(frozen=True)
class Config:
    state_dir: str
    listen: str
    log_level: str
    master_key_file: str
    shutdown_grace_s: float
    max_request_mb: float
    job_concurrency: int
    job_poll_s: float
    job_timeout_s: float
    job_max_attempts: int
    job_heartbeat_s: float
    job_stale_after_s: float
    allow_remote: bool
    max_connections: int
    header_timeout_s: float
    body_timeout_s: float
    tls_cert_file: str
    tls_key_file: str
    allow_plaintext_lan: bool
    run_jobs: bool
    model_memory_mb: float
    model_keep_alive_s: float
    model_queue: int
    request_timeout_s: float
    policy_file: str
    max_upload_mb: float
    inference_threads: int
    cpu_repack: str
    master_key_keep_previous_days: float
    runner_max_crashes: int
    audit_anchor_every: int
    cors_origins: tuple[str, ...]
    allow_unknown_fields: bool
    console_session_hours: float
    responses_retention_days: float
    source: str = field(default="defaults", compare=False)

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    @property
    def base_url(self) -> str:
        host = self.host
        if host in {"0.0.0.0", ""}:
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"{'https' if self.tls_cert_file else 'http'}://{host}:{self.port}"

    @property
    def loopback(self) -> bool:
        return self.host in {"127.0.0.1", "localhost", "::1"} or self.host.startswith("127.")

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "source"}


def _config_file(explicit: str | None, env: Mapping[str, str]) -> Path | None:
    if explicit:
        return Path(explicit)
    if env.get("GARRISON_CONFIG"):
        return Path(env["GARRISON_CONFIG"])
    return SYSTEM_CONFIG if SYSTEM_CONFIG.exists() else None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist", code="config_not_found") from None
    except PermissionError:
        raise ConfigError(f"configuration file {path} is not readable", code="config_unreadable") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}", code="config_syntax") from None
    # Accept both a flat file and one with a [garrison] table; [engine] holds the engine's keys.
    if isinstance(data.get("garrison"), dict):
        data = {**{k: v for k, v in data.items() if k != "garrison"}, **data["garrison"]}
    if isinstance(data.get("engine"), dict):
        data = {**{k: v for k, v in data.items() if k != "engine"}, **data["engine"]}
    return data


def load_config(config_file: str | None = None, *, overrides: Mapping[str, Any] | None = None,
                env: Mapping[str, str] | None = None) -> Config:
    """Build the configuration from defaults, the TOML file, the environment and flags."""
    env = os.environ if env is None else env
    path = _config_file(config_file, env)
    raw: dict[str, tuple[Any, str]] = {}
    if path is not None:
        for key, value in _read_toml(path).items():
            if key not in SETTINGS_BY_KEY:
                known = ", ".join(sorted(SETTINGS_BY_KEY))
                raise ConfigError(f"unknown key {key!r} in {path} (known keys: {known})",
                                  code="config_unknown_key", param=key)
            raw[key] = (value, str(path))
    for setting in SETTINGS:
        name = ENV_PREFIX + setting.key.upper()
        if name in env:
            raw[setting.key] = (env[name], f"environment variable {name}")
    for key, value in (overrides or {}).items():
        if value is not None:
            raw[key] = (value, f"command-line flag --{key.replace('_', '-')}")
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        if setting.key in raw:
            value, origin = raw[setting.key]
            try:
                values[setting.key] = setting.parse(value)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"invalid value {value!r} for key {setting.key!r} in {origin}: {exc}",
                                  code="config_invalid_value", param=setting.key) from None
        else:
            values[setting.key] = setting.parse(setting.default(env))
    config = Config(**values, source=str(path) if path else "defaults")
    if not config.allow_remote and not config.loopback:
        raise ConfigError(
            f"invalid value {config.listen!r} for key 'listen': not a loopback address; "
            "set allow_remote = true to expose Garrison beyond this machine",
            code="config_invalid_value", param="listen")
    if not config.loopback and not config.tls_cert_file and not config.allow_plaintext_lan:
        raise ConfigError(
            f"listening on {config.listen!r} (beyond this machine) needs TLS: set tls_cert_file and tls_key_file "
            "(`garrison tls new-cert` makes a self-signed pair), or allow_plaintext_lan = true behind a TLS proxy",
            code="config_invalid_value", param="tls_cert_file")
    return config


#: Markers around the reload table that docs/operator-guide.md embeds (tests/test_docs.py keeps it current).
RELOAD_BEGIN = "<!-- BEGIN reload: generated by `garrison docs reload`; do not edit by hand -->"
RELOAD_END = "<!-- END reload -->"
_RELOAD_HEADINGS = {
    Reload.LIVE: "applied at once",
    Reload.NEXT_LOAD: "applied to models loaded afterwards (`garrison stop MODEL` unloads one now)",
    Reload.RESTART: "need a restart (`config.needs_restart` is logged; the running value stays)",
}


def reload_label(setting: Setting) -> str:
    """The settings table's "on SIGHUP" cell."""
    return f"{setting.reload.value}: {setting.reload_note}" if setting.reload_note else setting.reload.value


def reload_markdown() -> str:
    """What SIGHUP applies, from the settings table: the operator guide embeds it between the markers."""
    lines = [RELOAD_BEGIN, ""]
    for mode, heading in _RELOAD_HEADINGS.items():
        keys = [f"`{s.key}` ({s.reload_note})" if s.reload_note else f"`{s.key}`"
                for s in SETTINGS if s.reload is mode]
        lines.append(f"- **{heading[0].upper()}{heading[1:]}:** {'; '.join(keys)}.")
    return "\n".join([*lines, "", RELOAD_END]) + "\n"


def settings_help() -> str:
    """One line per setting, for `--help` and the operator guide."""
    return "\n".join(f"{s.key} ({ENV_PREFIX}{s.key.upper()}): {s.doc}" for s in SETTINGS)
