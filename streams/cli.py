"""The ``usage-stream`` console script.

Settings are validated first, so a bad value prints one line naming it instead of a
traceback; ``worker`` also runs the components' start-up checks (:data:`PREFLIGHT`) and
creates the topics before Faust starts.
Everything else is Faust's own CLI (``worker`` and the ``@app.command`` commands),
presented as this product's (:func:`present_cli`): our help text, our commands in
sections (:data:`COMMAND_SECTIONS`), Faust's own commands hidden (:data:`FAUST_COMMANDS`:
they still run).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from streams.settings import Settings, SettingsError, get_settings

if TYPE_CHECKING:
    import click

__all__ = ["COMMAND_SECTIONS", "FAUST_COMMANDS", "fail", "main", "present_cli"]


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
    present_cli()
    if command == "worker" and "--help" not in sys.argv[2:]:
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


# The help ----------------------------------------------------------------------------

#: ``usage-stream --help``'s text, in place of Faust's welcome.
ABOUT = """Usage metering for an LLM gateway.

Reads the gateway's usage events from Kafka, deduplicates and prices them, writes one
raw point per request to InfluxDB and exact daily bills (USD and PLN, with markup) to
SQLite; reports, budgets and the price book work on that database.

\b
Try it on this machine (bundled broker, no InfluxDB needed):
  usage-stream dev --demo

Settings come from the environment (docs/contract.md §5). Run
'usage-stream COMMAND --help' for a command's options and an example.
"""

#: Every command of ours, by what it is for, in the order ``--help`` lists them. A
#: command in none of these is listed under "Other" (tests/e2e/test_cli_help.py fails).
COMMAND_SECTIONS: dict[str, tuple[str, ...]] = {
    "Run": ("worker", "dev"),
    "Data": ("publish", "replay", "raw-resend", "backup"),
    "Billing": ("report", "refresh", "budget", "markup"),
}

#: Faust's own commands: hidden from ``--help`` (they mean nothing to a user of this
#: product) but still runnable, e.g. ``usage-stream agents`` for a debugging session.
FAUST_COMMANDS = (
    "agents",
    "clean-versions",
    "completion",
    "livecheck",
    "model",
    "models",
    "reset",
    "send",
    "tables",
)

#: ``worker`` is Faust's command; this is its help (its options stay Faust's).
WORKER_HELP = """Run a worker: bill the usage events from Kafka into SQLite.

It also writes the raw points and serves /ready, /metrics and /usage. More workers
with the same APP_ID (on more hosts) share the partitions; the one with
SUMMARY_WRITER=true writes the summary DB. Stops cleanly on SIGTERM.

\b
Example:
  KAFKA_BROKER=kafka://kafka-1:9092 usage-stream worker -l info
"""


def present_cli() -> None:
    """Make Faust's root command this product's: :data:`ABOUT`, our commands in
    :data:`COMMAND_SECTIONS` (the standalone ones registered too, so ``--help`` lists
    them), and :data:`FAUST_COMMANDS` hidden. Names, options and behaviour are Faust's."""
    import importlib
    from types import MethodType

    from faust.cli.faust import cli as root

    for name, module in STANDALONE_COMMANDS.items():
        if name not in root.commands:
            root.add_command(importlib.import_module(module).standalone, name)
    root.help = ABOUT
    for name in FAUST_COMMANDS:
        if name in root.commands:
            root.commands[name].hidden = True
    if "worker" in root.commands:
        root.commands["worker"].help = WORKER_HELP
        root.commands["worker"].short_help = None
    root.format_commands = MethodType(_format_command_sections, root)  # type: ignore[method-assign]
    root.format_options = MethodType(_format_commands_then_options, root)  # type: ignore[method-assign]


def _format_commands_then_options(
    self: click.Group, ctx: click.Context, formatter: click.HelpFormatter
) -> None:
    """The commands first (what a user looks for), then Faust's global options."""
    self.format_commands(ctx, formatter)
    rows = [row for param in self.get_params(ctx) if (row := param.get_help_record(ctx))]
    if rows:
        with formatter.section("Global options (before the command)"):
            formatter.write_dl(rows)


def _format_command_sections(
    self: click.Group, ctx: click.Context, formatter: click.HelpFormatter
) -> None:
    """click's command list, in :data:`COMMAND_SECTIONS` (an "Other" section for any
    visible command in none of them)."""
    listed = {}
    for name in self.list_commands(ctx):
        command = self.get_command(ctx, name)
        if command is not None and not command.hidden:
            listed[name] = command
    if not listed:
        return
    sections = [
        (title, [name for name in names if name in listed])
        for title, names in COMMAND_SECTIONS.items()
    ]
    grouped = {name for _, names in sections for name in names}
    sections.append(("Other", sorted(set(listed) - grouped)))
    limit = formatter.width - 6 - max(len(name) for name in listed)
    for title, names in sections:
        if names:
            with formatter.section(title):
                formatter.write_dl(
                    [(name, listed[name].get_short_help_str(limit)) for name in names]
                )
