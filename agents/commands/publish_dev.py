"""Operator commands of Faust's CLI (agents/wiring.py registers them): publish and the
local ``dev`` stack.

Each command that belongs to an agent lives beside it (``refresh`` in agents/refresh.py,
``replay`` in agents/replay/run.py with its Faust command class in agents/replay/command.py,
``report``, ``raw-resend``), so this module imports no agent."""

from __future__ import annotations

import sys
from pathlib import Path

from faust.cli import argument, option

from streams.app import settings
from streams.cli import fail

__all__ = ["DEV_OPTIONS", "PUBLISH_OPTIONS", "dev", "publish"]

#: ``publish``'s argument in Faust's CLI
PUBLISH_OPTIONS = (argument("source", default="-", required=False),)


async def publish(self: object, source: str) -> None:
    """Publish JSON-lines events from FILE or stdin (-).

    Each line is one event, sent to the usage topic keyed by its request_id; prints how
    many were sent.

    \b
    Example:
      usage-stream publish events.jsonl
      gzip -dc events.jsonl.gz | usage-stream publish -
    """
    from streams.kafka.broker import BrokerUnreachable, TopicMismatch, ensure_topics
    from streams.kafka.producer import publish_lines

    try:
        await ensure_topics(settings)
        if source == "-":
            sent = await publish_lines(settings, sys.stdin.buffer)
        else:
            path = Path(source)
            if not path.is_file():
                fail(f"no such file: {source}")
            with path.open("rb") as lines:
                sent = await publish_lines(settings, lines)
    except (BrokerUnreachable, TopicMismatch) as error:
        fail(str(error))
    print(f"sent {sent} events to {settings.USAGE_TOPIC}")


#: ``dev``'s options in Faust's CLI
DEV_OPTIONS = (
    option("--demo/--no-demo", default=False, help="also run a synthetic producer"),
    option("--rate", default=200, type=int, help="demo events per second"),
)


async def dev(self: object, demo: bool, rate: int) -> None:
    """Run broker, worker and (--demo) a producer on localhost.

    The embedded stack: the bundled broker, the worker and, with --demo, a synthetic
    producer; Ctrl-C stops them in order.

    \b
    Example:
      usage-stream dev --demo --rate 500
    """
    from agents.dev.stack import run_dev_stack

    await run_dev_stack(settings, demo=demo, rate=rate)
