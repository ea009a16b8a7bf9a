"""``usage-stream replay`` in Faust's CLI, so ``usage-stream --help`` lists it
(agents/wiring.py registers :func:`replay` with :class:`DirectCommand`).

The plain ``usage-stream replay …`` runs without Faust: agents/main.py hands it to
:func:`agents.replay.run.standalone` before importing the Faust app (the import and Faust's
CLI took ~0.6 s of a ~10 s command). This registration serves the other spellings, such
as Faust's global options before the command name; both run the same coroutine with the
same options, outside a mode Worker (:func:`agents.replay.run.run_direct`).
"""

from __future__ import annotations

from typing import ClassVar, NoReturn

from faust.cli import AppCommand

from agents.replay.run import HELP, command, run_direct

__all__ = ["DirectCommand", "replay"]


class DirectCommand(AppCommand):
    """Runs the command with :func:`~agents.replay.run.run_direct` instead of a Worker."""

    abstract: ClassVar[bool] = True

    def run_using_worker(self, *args: object, **kwargs: object) -> NoReturn:
        args = self.args + args
        kwargs = {**self.kwargs, **kwargs}
        run_direct(lambda: self.execute(*args, **kwargs))


async def replay(
    self: object, day: str | None, from_offsets: str | None, dry_run: bool, allow_partial: bool
) -> None:
    await command(day, from_offsets, dry_run, allow_partial)


replay.__doc__ = HELP  # Faust's help is the handler's docstring: the standalone's text
