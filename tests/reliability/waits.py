"""What the broker outage and restart tests wait for: how far billing has got."""

from __future__ import annotations

from tests.harness import Stack

__all__ = ["billed", "billed_count"]


def billed_count(stack: Stack) -> int:
    """Unique requests billed so far (``Stack.billed_requests``), 0 before the DB exists."""
    if not stack.db_path.exists():  # (connecting would create it)
        return 0
    try:
        return stack.billed_requests()
    except Exception:  # noqa: BLE001 - schema not created yet
        return 0


def billed(stack: Stack, unique: int) -> bool:
    """Every unique request billed, nothing pending, and every day closed."""
    try:
        count = stack.billed_requests()
        (pending,) = stack.query("SELECT COUNT(*) FROM daily_pending")[0]
        (total,) = stack.query("SELECT COALESCE(SUM(requests), 0) FROM usage_daily")[0]
    except Exception:  # noqa: BLE001 - DB not created yet
        return False
    return count == unique and pending == 0 and total == unique
