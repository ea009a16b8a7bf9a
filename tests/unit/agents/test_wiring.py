"""The composition root (agents/wiring.py): after ``wire()`` an app holds exactly the
services, pages, tasks, timers, commands, start-up steps and shutdown hook listed here,
and nothing registers itself on import. A registration dropped from (or added to) the
wiring fails here before any worker runs.

Faust lists its services and tasks only in private attributes (``_extra_services``,
``_app_tasks``); reading them is the price of checking the real app rather than a fake.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from faust.cli.faust import cli as faust_cli

from agents.commands import backup, budget, markup
from agents.replay.command import DirectCommand
from agents.summary_writer.claim import claim_summary_writer
from agents.summary_writer.log_guard import guard_batch_log
from agents.summary_writer.writer import carry_over_offsets
from agents.wiring import Wiring, wire
from streams.app import UsageStreamApp, make_app
from streams.cli import FAUST_COMMANDS
from streams.settings import Settings, load_settings
from tables.summary_db.preflight import summary_db_writable

PAGES = {
    "/metrics": "metrics",
    "/health": "health",
    "/ready": "ready",
    "/status": "status",
    "/usage": "usage",
    "/v1/usage/query": "usage_query",
}
#: Faust commands of ours (an AppCommand each) and the click groups listed beside them
APP_COMMANDS = ("publish", "dev", "replay", "raw-resend", "report", "refresh")
CLICK_COMMANDS = {
    "backup": backup.standalone,
    "budget": budget.standalone,
    "markup": markup.standalone,
}


def wired(tmp_path: Path, **overrides: object) -> tuple[UsageStreamApp, Settings, Wiring]:
    settings = load_settings(DATA_DIR=str(tmp_path / "data"), **overrides)
    app = make_app(settings)
    return app, settings, wire(app, settings)


@pytest.fixture
def our_commands_removed() -> Iterator[None]:
    """Faust's CLI is one click group per process: take ours off it first, so only this
    test's ``wire()`` can have put them there."""
    saved = dict(faust_cli.commands)
    for name in (*APP_COMMANDS, *CLICK_COMMANDS):
        faust_cli.commands.pop(name, None)
    yield
    faust_cli.commands.clear()
    faust_cli.commands.update(saved)


def command_class(command: click.Command) -> type:
    """The Faust command class behind a click command (``AppCommand.as_click_command``
    wraps it in two functions)."""
    wrapped: Any = command.callback
    while not inspect.isclass(wrapped):
        wrapped = wrapped.__wrapped__
    return wrapped


def task_list(app: UsageStreamApp) -> list[tuple[str, Callable[..., Awaitable[None]], Any]]:
    """``(kind, function, interval)`` of each task and timer, in registration order. A
    timer is a task around Faust's ``around_timer``, which holds ``interval_s``."""
    found = []
    for task in app._app_tasks:
        inner = task.__wrapped__  # type: ignore[attr-defined]
        if hasattr(inner, "__wrapped__") and inner.__name__ == inner.__wrapped__.__name__:
            cells = dict(
                zip(
                    inner.__code__.co_freevars,
                    (cell.cell_contents for cell in inner.__closure__),
                    strict=True,
                )
            )
            found.append(("timer", inner.__wrapped__, cells["interval_s"]))
        else:
            found.append(("task", inner, None))
    return found


def test_the_summary_writer_is_wired_with_everything(
    tmp_path: Path, our_commands_removed: None
) -> None:
    app, settings, wiring = wired(tmp_path)
    assert settings.SUMMARY_WRITER

    # services, in the order the app starts them
    assert app._extra_services == [
        wiring.budget_alerts,
        wiring.hot_path,
        wiring.summary_writer,
        wiring.readiness,
    ]
    assert None not in app._extra_services

    # the objects the services share are the wiring's
    assert wiring.summary_writer is not None
    assert wiring.summary_writer.closer is wiring.closer is wiring.rollup.closer
    assert wiring.rollup.db is wiring.db is wiring.readiness.db is wiring.hot_path.prices.db
    assert wiring.readiness.hot_path is wiring.hot_path
    assert wiring.readiness.writer is wiring.summary_writer

    # pages: path -> handler
    views = app.web.views
    assert {path: type(view).__name__ for path, view in views.items()} == PAGES
    ready = type(views["/ready"]).get
    assert wiring.readiness in [cell.cell_contents for cell in ready.__closure__ or ()]

    # tasks and timers
    assert task_list(app) == [
        ("task", wiring.refresh.on_schedule, None),
        ("timer", wiring.refresh.retry_failed, 900.0),
        ("task", wiring.refresh.at_start, None),
        ("timer", wiring.rollup.tick, settings.ROLLUP_INTERVAL_SECONDS),
    ]

    # commands: ours and Faust's own, nothing else
    assert set(faust_cli.commands) == {
        "worker",
        *FAUST_COMMANDS,
        *APP_COMMANDS,
        *CLICK_COMMANDS,
    }
    for name, command in CLICK_COMMANDS.items():
        assert faust_cli.commands[name] is command
    assert issubclass(command_class(faust_cli.commands["replay"]), DirectCommand)

    # start-up steps and the shutdown hook
    assert wiring.preflight == (summary_db_writable,)
    assert wiring.after_topics == (claim_summary_writer, carry_over_offsets, guard_batch_log)
    hooks = list(app.on_before_shutdown.iter_receivers(app))
    assert [hook.__name__ for hook in hooks] == ["close_summary_db"]  # type: ignore[union-attr]


def test_a_worker_without_the_summary_db_has_no_writer_services(tmp_path: Path) -> None:
    app, _, wiring = wired(tmp_path, SUMMARY_WRITER=False)
    assert wiring.summary_writer is None and wiring.budget_alerts is None
    assert app._extra_services == [wiring.hot_path, wiring.readiness]
    assert wiring.readiness.writer is None
    assert set(app.web.views) == set(PAGES)
    assert len(app._app_tasks) == 4  # each returns at once where SUMMARY_WRITER is false


async def test_the_shutdown_hook_closes_the_shared_connection(tmp_path: Path) -> None:
    app, _, wiring = wired(tmp_path)
    first = await wiring.db.get()
    await app.on_before_shutdown.send()
    assert await wiring.db.get() is not first  # closed, so opened anew
    await wiring.db.close()


def test_wiring_opens_nothing(tmp_path: Path) -> None:
    """``wire()`` runs for every command of Faust's CLI (``report``, ``dev``...): making
    the services must not touch the disk, a broker or the summary DB."""
    wired(tmp_path)
    assert not (tmp_path / "data").exists()


def test_importing_every_module_registers_nothing(our_commands_removed: None) -> None:
    """Importing any module adds no command to Faust's CLI (its one process-wide click
    group: an ``AppCommand`` subclass lands there when defined); there is no app to put
    a service, page or task on but the one ``wire()`` is given."""
    for package_name in ("agents", "tables", "streams"):
        package = importlib.import_module(package_name)
        for module in pkgutil.walk_packages(package.__path__, prefix=f"{package_name}."):
            if module.name != "agents.__main__":  # runs the console script
                importlib.import_module(module.name)
    assert set(faust_cli.commands) == {"worker", *FAUST_COMMANDS}
