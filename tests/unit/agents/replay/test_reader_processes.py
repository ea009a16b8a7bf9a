"""ReaderProcesses.close(): no reader's dedupe file outlives the replay, even when a
reader has to be killed."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from agents.replay import readers
from agents.replay.readers import ReaderProcesses, _Reader

#: A reader stand-in that takes a staging directory (its dedupe file, locked while it
#: lives, as a real reader's), says so, and then ignores SIGTERM and its closed stdin.
STUBBORN = """
import signal, sys, time
from pathlib import Path
from tables.summary_db.replay_staging import ReplayStaging
signal.signal(signal.SIGTERM, signal.SIG_IGN)
staging = ReplayStaging(Path(sys.argv[1]))
print("ready", flush=True)
time.sleep(120)
"""


async def _stubborn_reader(directory: Path) -> _Reader:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        STUBBORN,
        str(directory),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=Path(readers.__file__).resolve().parents[2],
    )
    assert process.stdout is not None
    assert await asyncio.wait_for(process.stdout.readline(), 30) == b"ready\n"
    return _Reader([0], process)


def test_a_reader_killed_at_close_leaves_no_dedupe_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(readers, "EXIT_SECONDS", 0.5)

    async def scenario() -> None:
        processes = ReaderProcesses(1, tmp_path)
        processes.readers.append(await _stubborn_reader(tmp_path))
        assert list(tmp_path.glob(".replay-*"))
        await processes.close()
        assert processes.readers[0].process.returncode is not None

    asyncio.run(scenario())
    assert not list(tmp_path.glob(".replay-*"))


def test_without_its_directory_close_still_ends_every_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep is what removes the file: without it, the killed reader's file stays
    (for the next replay's sweep)."""
    monkeypatch.setattr(readers, "EXIT_SECONDS", 0.5)

    async def scenario() -> None:
        processes = ReaderProcesses(1)
        processes.readers.append(await _stubborn_reader(tmp_path))
        await processes.close()
        assert processes.readers[0].process.returncode is not None

    asyncio.run(scenario())
    assert len(list(tmp_path.glob(".replay-*"))) == 1
