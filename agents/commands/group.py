"""Click groups for the operator commands that run without the Faust app (``budget``,
``markup``): one clear line for every mistake, tables and JSON on stdout.

Click's own usage errors print a usage block and a hint over four lines; an operator
script wants one, like every other ``usage-stream`` error (:func:`streams.cli.fail`).
:class:`OneLineGroup` runs click in non-standalone mode and turns its errors into that
line (exit 2, click's usage-error status). The same groups are listed in
``usage-stream --help`` through Faust's CLI (agents/wiring.py adds them there).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import click
import orjson

from streams.cli import fail

__all__ = ["OneLineGroup", "format_option", "print_json", "print_table", "single_line"]


class OneLineGroup(click.Group):
    """A group whose click errors end as one line on stderr (module docstring)."""

    def main(  # type: ignore[override]
        self, args: Sequence[str] | None = None, prog_name: str | None = None, **extra: Any
    ) -> None:
        try:
            code = super().main(
                args=list(args) if args is not None else None,
                prog_name=prog_name,
                standalone_mode=False,
                **extra,
            )
        except click.exceptions.NoArgsIsHelpError as error:  # the bare group: its help
            print(
                error.ctx.get_help()
                if error.ctx
                else self.get_help(self.make_context(prog_name or self.name or "", []))
            )
            raise SystemExit(2) from None
        except click.ClickException as error:
            ctx = getattr(error, "ctx", None)
            where = ctx.command_path if ctx is not None else prog_name or self.name
            where = str(where).removeprefix("usage-stream ")
            fail(f"{where}: {single_line(error.format_message())}", 2)
        except click.Abort:
            fail("interrupted; nothing changed", 130)
        raise SystemExit(code if isinstance(code, int) else 0)


#: ``--format`` of the groups' ``list`` commands: one option, so that every list offers
#: the same choices under the same name (scripts switch between them).
format_option = click.option(
    "--format",
    "output_format",
    type=click.Choice(["table", "json"]),
    default="table",
    help="table (terminal) or json",
)


def single_line(text: str) -> str:
    return " ".join(text.split())


def print_json(value: object) -> None:
    sys.stdout.buffer.write(orjson.dumps(value, option=orjson.OPT_INDENT_2) + b"\n")
    sys.stdout.flush()


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A rich table (the terminal's width, else ``COLUMNS`` or 250 for a file), never
    cutting a value: a cut amount or URL is worse than a wrapped one."""
    from rich.console import Console
    from rich.table import Table

    width = None
    if not sys.stdout.isatty():
        try:
            width = int(os.environ.get("COLUMNS") or 250)
        except ValueError:
            width = 250
    console = Console(width=width, highlight=False)
    table = Table(title=title, title_justify="left")
    for name in columns:
        table.add_column(name, overflow="fold")
    for row in rows:
        table.add_row(*row)
    console.print(table)
