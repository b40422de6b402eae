"""Model names: what a user may call a model, checked once for the CLI and the API alike.

A name becomes a folder under the state directory and an id in `/v1/models`, so it must
never carry a path separator or `..`; `:` is reserved for artifact variants (`NAME:q4_k_m`).
"""

from __future__ import annotations

import re

from garrison.errors import InvalidRequest

MAX_NAME = 96
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_VARIANT = re.compile(r"[a-z0-9][a-z0-9._-]*")


def check_name(name: str, *, param: str = "name") -> str:
    """A base model name: letters, digits, '.', '_', '-'; no '..'; at most MAX_NAME characters."""
    if not isinstance(name, str) or not name:
        raise InvalidRequest("a model name is required", param=param, code="invalid_model_name")
    if len(name) > MAX_NAME:
        raise InvalidRequest(f"model name longer than {MAX_NAME} characters", param=param, code="invalid_model_name")
    if ".." in name or not _NAME.fullmatch(name):
        raise InvalidRequest(f"invalid model name {name[:MAX_NAME]!r}: use letters, digits, '.', '_' and '-' "
                             "(no path separators, no '..')", param=param, code="invalid_model_name")
    return name


def check_model_id(model_id: str, *, param: str = "model") -> str:
    """A servable id: NAME or NAME:VARIANT."""
    if not isinstance(model_id, str):
        raise InvalidRequest("'model' must be a string", param=param, code="invalid_model_name")
    base, sep, variant = model_id.partition(":")
    check_name(base, param=param)
    if sep and (not _VARIANT.fullmatch(variant) or ".." in variant or len(variant) > 32):
        raise InvalidRequest(f"invalid model variant {variant[:32]!r}", param=param, code="invalid_model_name")
    return model_id


def derived_name(source: str, label: str, suffix: str, job_id: str) -> str:
    """The name a job registers what it made from `source` under: `SOURCE-LABEL-SUFFIX`, else the job
    id's tail (`tiny-ft-3f9a0c1d`, `tiny-pruned-...`). One rule for the job that registers it and the
    routes that name it before it exists."""
    tail = (suffix or job_id[-8:]).lower()
    return check_name(f"{source.replace(':', '-')}-{label}-{tail}"[:MAX_NAME], param="suffix")


def fine_tuned_name(base: str, suffix: str, job_id: str) -> str:
    return derived_name(base, "ft", suffix, job_id)
