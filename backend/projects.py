"""Label Studio's project references, read the one way every route and webhook needs."""

from __future__ import annotations

from typing import Any, Optional

MAX_PROJECT_ID = 2**63 - 1  # Label Studio's ids are database integers


def project_id(value: Any) -> Optional[int]:
    """Label Studio's project reference in its forms: ``3``, ``"3.1700000000"`` (/setup, /predict),
    ``{"id": 3, ...}`` (webhooks). None when absent or not a project id."""
    if isinstance(value, dict):
        value = value.get("id")
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value <= MAX_PROJECT_ID else None
    if isinstance(value, str):
        head = value.strip().split(".", 1)[0]
        # ASCII digits only: str.isdigit() also takes "²" (int() fails) and "٣" (int() reads 3)
        if head.isascii() and head.isdigit() and len(head) <= 19 and int(head) <= MAX_PROJECT_ID:
            return int(head)
    return None
