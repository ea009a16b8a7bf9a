"""``usage-stream budget`` and ``markup`` in Faust's CLI, so ``usage-stream --help`` lists
them. The plain ``usage-stream budget …`` / ``markup …`` run without Faust (streams/cli.py
hands them to their modules' ``standalone`` groups); this registration serves the other
spellings, such as Faust's global options before the command name."""

from __future__ import annotations

from faust.cli.base import cli

from agents.commands.budget import standalone as budget
from agents.commands.markup import standalone as markup

for _group in (budget, markup):
    if _group.name not in cli.commands:
        cli.add_command(_group)
