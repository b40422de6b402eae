"""Per-key rate limits and quotas, from the policy file's `[rate_limits]` table.

Placeholder shape shared by the policy loader; the limiter itself is built on top of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from garrison.errors import InvalidRequest


@dataclass(frozen=True)
class RateLimitPolicy:
    """No limits unless the policy file sets them."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, *, where: str = "rate_limits") -> RateLimitPolicy:
        if data:
            raise InvalidRequest(f"[{where}] is not supported yet", code="invalid_policy", param=where)
        return cls()
