"""The ``usage-stream`` console script.

Settings are validated first, so a bad value prints one line naming it instead of a
traceback; ``worker`` also creates the topics and opens the summary DB before Faust starts.
Everything else is Faust's own CLI (``worker`` and the ``@app.command`` commands).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import sys

from streams.settings import SettingsError, get_settings

__all__ = ["fail", "main"]


def fail(message: str, code: int = 1) -> None:
    """Print one line to stderr and exit: the way every operator mistake ends."""
    print(f"usage-stream: {message}", file=sys.stderr)
    raise SystemExit(code)


async def _prepare_worker() -> None:
    from streams.broker import ensure_topics
    from tables.schema import connect

    settings = get_settings()
    try:
        conn = await connect(settings.summary_db_path)
        await conn.close()
    except (sqlite3.Error, OSError) as error:
        fail(f"summary DB {settings.summary_db_path} is not writable: {error}")
    await ensure_topics(settings)


def main() -> None:
    # aiokafka logs connection failures itself; the one line below is the operator's answer.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        get_settings()
    except SettingsError as error:
        fail(str(error), 2)
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        from streams.broker import BrokerUnreachable

        try:
            asyncio.run(_prepare_worker())
        except BrokerUnreachable as error:
            fail(str(error))
    from streams.app import app

    _import_components()
    logging.getLogger("aiokafka").setLevel(logging.NOTSET)
    app.main()


def _import_components() -> None:
    """Import every agent and table module now: Faust's autodiscovery only *logs* an import
    error and starts without the broken agent, which a billing pipeline must never do."""
    import importlib
    import pkgutil

    for package_name in ("agents", "tables"):
        package = importlib.import_module(package_name)
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package_name}.{module.name}")
