"""The appliance's policy file: one TOML document, one section per concern, validated whole.

    retention_days = 90               # ingest: versions older than this are shredded
    [redaction]                       # ingest: what happens to personal data in delivered files
    [rate_limits]                     # per-key and per-role request/token limits (policies.rate_limits)
    [inference_privacy]               # PII detectors on prompts and responses (operations.inference_privacy)

Each section is one row of `SECTIONS`: the top-level keys it owns and the parser that turns them
into its typed policy. A mistake anywhere refuses the whole file, naming the key, so a reload
never applies half a policy.
"""

from __future__ import annotations

import hashlib
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from garrison.config import Config
from garrison.errors import InvalidRequest
from garrison.ingest.pipeline import IngestPolicy, policy_file
from garrison.operations.inference_privacy import InferencePrivacyPolicy
from garrison.policies.rate_limits import RateLimitPolicy


@dataclass(frozen=True)
class Section:
    name: str
    keys: frozenset[str]
    parse: Callable[[Mapping[str, Any]], Any]


def _sub(data: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    value = data.get(key)
    if value is not None and not isinstance(value, Mapping):
        raise InvalidRequest(f"[{key}] must be a table", code="invalid_policy", param=key)
    return value


SECTIONS: tuple[Section, ...] = (
    Section("ingest", frozenset({"redaction", "retention_days"}), IngestPolicy.from_dict),
    Section("rate_limits", frozenset({"rate_limits"}),
            lambda data: RateLimitPolicy.from_dict(_sub(data, "rate_limits"))),
    Section("inference_privacy", frozenset({"inference_privacy"}),
            lambda data: InferencePrivacyPolicy.from_dict(_sub(data, "inference_privacy"))),
)


@dataclass(frozen=True)
class AppliancePolicy:
    """Everything the operator decided in the policy file; `source` says where it came from."""

    ingest: IngestPolicy = field(default_factory=IngestPolicy)
    rate_limits: RateLimitPolicy = field(default_factory=RateLimitPolicy)
    inference_privacy: InferencePrivacyPolicy = field(default_factory=InferencePrivacyPolicy)
    source: str = "built-in defaults"
    digest: str = ""  # SHA-256 of the policy file's text: the audit trail records which policy ran when

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "built-in defaults",
                  digest: str = "") -> AppliancePolicy:
        known = frozenset().union(*(s.keys for s in SECTIONS))
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidRequest(f"unknown key(s) in the policy: {', '.join(unknown)}; expected "
                                 f"{', '.join(sorted(known))}", code="invalid_policy", param=unknown[0])
        parsed = {s.name: s.parse({k: v for k, v in data.items() if k in s.keys}) for s in SECTIONS}
        return cls(**parsed, source=source, digest=digest)

    @classmethod
    def from_toml(cls, text: str, *, source: str = "built-in defaults") -> AppliancePolicy:
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise InvalidRequest(f"the policy is not valid TOML: {exc}", code="invalid_policy") from None
        return cls.from_dict(doc, source=source, digest=hashlib.sha256(text.encode()).hexdigest())

    @classmethod
    def from_file(cls, path: Path) -> AppliancePolicy:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise InvalidRequest(f"cannot read the policy file {path}: {exc.strerror}",
                                 code="invalid_policy") from None
        return cls.from_toml(text, source=str(path))


def load_appliance_policy(config: Config) -> AppliancePolicy:
    path = policy_file(config)
    return AppliancePolicy.from_file(path) if path is not None else AppliancePolicy()
