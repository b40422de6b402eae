"""Privacy on the inference path, from the policy file's `[inference_privacy]` table.

Placeholder shape shared by the policy loader; the filter itself is built on top of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from garrison.errors import InvalidRequest


@dataclass(frozen=True)
class InferencePrivacyPolicy:
    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, *,
                  where: str = "inference_privacy") -> InferencePrivacyPolicy:
        if data:
            raise InvalidRequest(f"[{where}] is not supported yet", code="invalid_policy", param=where)
        return cls()
