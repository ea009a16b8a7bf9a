"""The generic parts of the ``usage-stream`` console script, whose entry point is
:func:`agents.main.main` (the wiring of this product's services and commands is in
``agents``, above this package).

* :func:`begin`: the settings validated first, so a bad value prints one line naming it
  instead of a traceback;
* :func:`prepare_worker`: ``worker`` runs the start-up checks it is given (the preflight
  checks), creates the topics and runs the after-topics steps, before Faust starts;
* :func:`present_cli` and :func:`run_app`: everything else is Faust's own CLI (``worker``
  and the commands the wiring registered), presented as this product's: our help text,
  our commands in sections (:data:`COMMAND_SECTIONS`), Faust's own commands hidden
  (:data:`FAUST_COMMANDS`: they still run);
* :func:`fail`: the one line every operator mistake ends with.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, NoReturn

from streams.settings import Settings, SettingsError, get_settings

if TYPE_CHECKING:
    import click
    import faust

__all__ = [
    "COMMAND_SECTIONS",
    "FAUST_COMMANDS",
    "AfterTopics",
    "Preflight",
    "begin",
    "fail",
    "prepare_worker",
    "present_cli",
    "run_app",
]


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one line to stderr and exit: the way every operator mistake ends."""
    print(f"usage-stream: {message}", file=sys.stderr)
    raise SystemExit(code)


#: A start-up check: None, or a one-line problem on which the worker does not start.
Preflight = Callable[[Settings], Awaitable[str | None]]

#: A step run once the topics exist, before the worker starts.
AfterTopics = Callable[[Settings], Awaitable[None]]


def begin() -> Settings:
    """The console script's first step, before the app is imported (importing it reads
    the settings): the settings, or one line naming the bad one (exit 2). aiokafka's own
    logs of connection failures are silenced meanwhile: the one line of :func:`fail` is
    the operator's answer (:func:`run_app` gives them back to the worker)."""
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        return get_settings()
    except SettingsError as error:
        fail(str(error), 2)


def prepare_worker(
    settings: Settings, preflight: Sequence[Preflight], after_topics: Sequence[AfterTopics]
) -> None:
    """Before Faust starts a worker: its directories, the ``preflight`` checks (the first
    problem ends in one line), the topics, then the ``after_topics`` steps. A broker that
    cannot be reached, or a topic that does not match, is one line too."""
    from streams.kafka.broker import BrokerUnreachable, TopicMismatch

    try:
        asyncio.run(_prepare_worker(settings, preflight, after_topics))
    except (BrokerUnreachable, TopicMismatch) as error:
        fail(str(error))


async def _prepare_worker(
    settings: Settings, preflight: Sequence[Preflight], after_topics: Sequence[AfterTopics]
) -> None:
    from streams.kafka.broker import ensure_topics

    _make_directories(settings)
    for check in preflight:
        problem = await check(settings)
        if problem:
            fail(problem)
    await ensure_topics(settings)
    for step in after_topics:
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


def run_app(app: faust.App) -> None:
    """Hand the command line to Faust's CLI, with aiokafka's logs back at their level."""
    logging.getLogger("aiokafka").setLevel(logging.NOTSET)
    app.main()


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
    :data:`COMMAND_SECTIONS`, and :data:`FAUST_COMMANDS` hidden. Names, options and
    behaviour are Faust's (and the commands are the ones the wiring registered)."""
    from types import MethodType

    from faust.cli.faust import cli as root

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
