"""The ``usage-stream`` console script.

Settings are validated first, so a bad value prints one line naming it instead of a
traceback; ``worker`` also runs the components' start-up checks (:data:`PREFLIGHT`) and
creates the topics before Faust starts.
Everything else is Faust's own CLI (``worker`` and the ``@app.command`` commands).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable

from streams.settings import Settings, SettingsError, get_settings

__all__ = ["fail", "main"]


def fail(message: str, code: int = 1) -> None:
    """Print one line to stderr and exit: the way every operator mistake ends."""
    print(f"usage-stream: {message}", file=sys.stderr)
    raise SystemExit(code)


#: Start-up checks that component packages register (``tables`` registers "the summary
#: DB is writable"): each returns None or a one-line problem, and the worker does not
#: start on a problem. The CLI knows no component: it runs what they registered.
PREFLIGHT: list[Callable[[Settings], Awaitable[str | None]]] = []


#: Steps that component packages register to run once the topics exist, before the
#: worker starts (``agents`` registers carrying an upgraded summary DB's offsets over).
AFTER_TOPICS: list[Callable[[Settings], Awaitable[None]]] = []


async def _prepare_worker() -> None:
    from streams.kafka.broker import ensure_topics

    settings = get_settings()
    _make_directories(settings)
    for check in PREFLIGHT:
        problem = await check(settings)
        if problem:
            fail(problem)
    await ensure_topics(settings)
    for step in AFTER_TOPICS:
        await step(settings)


def _make_directories(settings: Settings) -> None:
    """Create ``DATA_DIR`` and Faust's data dir with their parents before Faust starts:
    Faust creates its data dir without parents, so a worker whose ``DATA_DIR`` does not
    exist yet crashed with a traceback (a summary writer got it created by opening the DB;
    a worker with ``SUMMARY_WRITER=false`` opens nothing there first)."""
    named = [("DATA_DIR", settings.DATA_DIR)]
    named.append(("STATE_DIR" if settings.STATE_DIR else "DATA_DIR", settings.state_dir))
    for name, directory in named:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            fail(f"{name}: cannot create {directory}: {error.strerror or error}")


def main() -> None:
    # aiokafka logs connection failures itself; the one line below is the operator's answer.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        get_settings()
    except SettingsError as error:
        fail(str(error), 2)
    command = sys.argv[1] if len(sys.argv) > 1 else None
    if command in STANDALONE_COMMANDS:
        # its own module's click command, without the Faust app: the command's start-up
        # is part of its time
        import importlib

        standalone = importlib.import_module(STANDALONE_COMMANDS[command]).standalone
        standalone.main(args=sys.argv[2:], prog_name=f"usage-stream {command}")
        return
    from streams.app import app

    _import_components()
    if command == "worker":
        from streams.kafka.broker import BrokerUnreachable, TopicMismatch

        try:
            asyncio.run(_prepare_worker())
        except (BrokerUnreachable, TopicMismatch) as error:
            fail(str(error))
    logging.getLogger("aiokafka").setLevel(logging.NOTSET)
    app.main()


#: Commands run by their own module's click command (``standalone``), without the Faust
#: app. ``replay`` is a batch command timed as a whole: importing every agent (the
#: InfluxDB client, the web views...), Faust's autodiscovery scan and then Faust and its
#: CLI themselves cost it ~2 s of start-up, for nothing it uses. (Faust's CLI lists it
#: too, agents/replay/command.py.)
STANDALONE_COMMANDS = {
    "replay": "agents.replay.run",
    "backup": "agents.commands.backup",
    # the price book and budgets: short commands on the summary DB alone
    "markup": "agents.commands.markup",
    "budget": "agents.commands.budget",
}


def _import_components() -> None:
    """Import every agent and table module now: Faust's autodiscovery only *logs* an import
    error and starts without the broken agent, which a billing pipeline must never do."""
    import importlib
    import pkgutil

    for package_name in ("agents", "tables"):
        package = importlib.import_module(package_name)
        for module in pkgutil.walk_packages(package.__path__, prefix=f"{package_name}."):
            importlib.import_module(module.name)
