"""``usage-stream --help`` is the product's: what it is, our commands in sections, Faust's
own commands hidden (still runnable), and an example in every command's help.

Each test runs the installed console script in a subprocess, with no broker: help must
never need one (``worker --help`` used to try to create the topics first).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(sys.executable).parent / "usage-stream"

SECTIONS = {
    "Run": ["worker", "dev"],
    "Data": ["publish", "replay", "raw-resend", "backup"],
    "Billing": ["report", "refresh", "budget", "markup"],
}
SUBCOMMANDS = {"budget": ["list", "rm", "set"], "markup": ["list", "set"]}
FAUST_COMMANDS = [
    "agents",
    "clean-versions",
    "completion",
    "livecheck",
    "model",
    "models",
    "reset",
    "send",
    "tables",
]

COMMANDS = [name for names in SECTIONS.values() for name in names]
EVERY_COMMAND = COMMANDS + [
    f"{group} {name}" for group, names in SUBCOMMANDS.items() for name in names
]


def run(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("INFLUXDB_", "KAFKA_"))},
        "DATA_DIR": str(tmp_path / "data"),
        "KAFKA_BROKER": "kafka://127.0.0.1:9",  # nothing listens: help must not connect
        "COLUMNS": "80",
    }
    return subprocess.run(
        [str(SCRIPT), *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


def sections(help_text: str) -> dict[str, list[str]]:
    """``Title:`` headings and the command names listed under each (indented rows)."""
    found: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in help_text.splitlines():
        if heading := re.fullmatch(r"(\S.*):", line):
            current = found.setdefault(heading.group(1), [])
        elif current is not None and (row := re.match(r"  ([a-z][a-z-]*)(  |$)", line)):
            current.append(row.group(1))
    return found


def test_top_help_says_what_usage_stream_is_and_groups_its_commands(tmp_path: Path) -> None:
    result = run("--help", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.startswith("Usage: usage-stream [OPTIONS] COMMAND [ARGS]...")
    assert "Usage metering for an LLM gateway" in text
    assert "Welcome" not in text and "faust-streaming.github.io" not in text
    listed = sections(text)
    assert {title: listed.get(title) for title in SECTIONS} == SECTIONS
    # every visible command is in a section of ours: none falls under "Other"
    assert "Other" not in listed
    assert "Commands" not in listed
    # the sections come before Faust's global options
    assert text.index("Run:") < text.index("Billing:") < text.index("Global options")


def test_faust_commands_are_hidden_but_still_run(tmp_path: Path) -> None:
    text = run("--help", tmp_path=tmp_path).stdout
    listed = {name for names in sections(text).values() for name in names}
    assert listed.isdisjoint(FAUST_COMMANDS)
    for name in FAUST_COMMANDS:
        assert not re.search(rf"^  {name}\b", text, re.MULTILINE), name
    hidden = run("tables", "--help", tmp_path=tmp_path)
    assert hidden.returncode == 0, hidden.stderr
    assert "List available tables" in hidden.stdout


@pytest.mark.parametrize("group", sorted(SUBCOMMANDS))
def test_groups_list_their_subcommands(group: str, tmp_path: Path) -> None:
    result = run(group, "--help", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(sections(result.stdout)["Commands"]) == SUBCOMMANDS[group]


def example_lines(help_text: str) -> list[str]:
    """The lines of the help's ``Example:`` block."""
    _, marker, after = help_text.partition("Example:\n")
    assert marker, f"no 'Example:' in:\n{help_text}"
    lines = []
    for line in after.splitlines():
        if not line.startswith("    "):
            break
        lines.append(line.strip())
    return lines


@pytest.mark.parametrize("command", EVERY_COMMAND)
def test_every_command_help_has_an_example(command: str, tmp_path: Path) -> None:
    result = run(*command.split(), "--help", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"Usage: usage-stream {command} ")
    examples = example_lines(result.stdout)
    assert any(f"usage-stream {command}" in line for line in examples), examples


@pytest.mark.parametrize("command", ["replay", "backup", "budget", "markup"])
def test_faust_spelling_of_a_standalone_command_has_the_same_help(
    command: str, tmp_path: Path
) -> None:
    """``usage-stream -q replay`` (a global option first) runs through Faust's CLI, not
    the command's standalone entry: its help is the same text, example included."""
    plain = run(command, "--help", tmp_path=tmp_path)
    through_faust = run("-q", command, "--help", tmp_path=tmp_path)
    assert through_faust.returncode == 0, through_faust.stderr
    assert example_lines(through_faust.stdout) == example_lines(plain.stdout)
