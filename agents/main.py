"""The ``usage-stream`` console script (``[project.scripts]``; ``python -m agents`` is the
same): the settings first, then either a command that runs without the Faust app, or the
app, wired (:func:`agents.wiring.wire`), under Faust's CLI. The generic steps are
:mod:`streams.cli`'s; this module is above every package, so it may import them all.
"""

from __future__ import annotations

import importlib
import sys

from streams.cli import begin, prepare_worker, present_cli, run_app

__all__ = ["STANDALONE_COMMANDS", "main"]

#: Commands run by their own module's click command (``standalone``), without the Faust
#: app. ``replay`` is a batch command timed as a whole: importing every agent (the
#: InfluxDB client, the web views...) and then Faust and its CLI themselves cost it ~2 s
#: of start-up, for nothing it uses. Faust's CLI lists them too (agents/wiring.py), for
#: ``--help`` and the spellings with Faust's global options before the command name.
STANDALONE_COMMANDS = {
    "replay": "agents.replay.run",
    "backup": "agents.commands.backup",
    # the price book and budgets: short commands on the summary DB alone
    "markup": "agents.commands.markup",
    "budget": "agents.commands.budget",
}


def main() -> None:
    settings = begin()
    command = sys.argv[1] if len(sys.argv) > 1 else None
    if command in STANDALONE_COMMANDS:
        # the command's start-up is part of its time: only its own module is imported
        standalone = importlib.import_module(STANDALONE_COMMANDS[command]).standalone
        standalone.main(args=sys.argv[2:], prog_name=f"usage-stream {command}")
        return
    from agents.wiring import wire
    from streams.app import make_app

    app = make_app(settings)
    wiring = wire(app, settings)
    present_cli()
    if command == "worker" and "--help" not in sys.argv[2:]:
        prepare_worker(settings, wiring.preflight, wiring.after_topics)
    run_app(app)
