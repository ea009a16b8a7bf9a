"""Raw file retention: gzip finished UTC days, delete expired ones, never lose a line.

Everything runs on a real temporary directory with the real :class:`FileWriter`; the
decompressed files are checked byte for byte, with the system ``gzip -dc`` too, and
imported into a real influxd.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import gzip
import os
import shutil
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from streams.sinks.files import FileWriter
from streams.sinks.lineprotocol import RawPoint, to_line
from streams.sinks.raw_retention import LOCK_NAME, maintain_raw_files

Factory = Callable[..., RawPoint]

DAY = dt.date(2026, 11, 20)
DAY_MS = 1_795_169_472_123  # 2026-11-20T10:11:12.123Z
NEXT_DAY_MS = DAY_MS + 86_400_000
DAY_ENDED = dt.datetime(2026, 11, 21, tzinfo=dt.UTC)
GRACE = 3600.0
SECOND = dt.timedelta(seconds=1)


def lp(directory: Path, day: dt.date = DAY) -> Path:
    return directory / f"usage_tracking-{day.isoformat()}.lp"


def gz(directory: Path, day: dt.date = DAY) -> Path:
    return directory / f"usage_tracking-{day.isoformat()}.lp.gz"


def gunzip(path: Path) -> bytes:
    """The file as ``gzip -dc`` prints it (the system tool when present, else Python's)."""
    tool = shutil.which("gzip")
    if tool is None:
        return gzip.decompress(path.read_bytes())
    return subprocess.run([tool, "-dc", str(path)], check=True, capture_output=True).stdout


def data_lines(text: bytes) -> list[str]:
    return [line for line in text.decode().splitlines() if not line.startswith("#")]


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


def write(writer: FileWriter, *points: RawPoint) -> list[str]:
    lines = [to_line(point) for point in points]
    writer._write_sync(lines)
    return lines


def test_gzipped_once_the_day_and_grace_are_over_byte_for_byte(
    tmp_path: Path, make_point: Factory
) -> None:
    writer = FileWriter(tmp_path)
    write(writer, *(make_point(event_ms=DAY_MS + i) for i in range(50)))
    write(writer, make_point(event_ms=NEXT_DAY_MS))
    original = lp(tmp_path).read_bytes()

    early = maintain_raw_files(tmp_path, DAY_ENDED + dt.timedelta(seconds=GRACE) - SECOND, 30)
    assert early.gzipped == [] and early.deleted == []
    assert names(tmp_path) == ["usage_tracking-2026-11-20.lp", "usage_tracking-2026-11-21.lp"]

    done = writer.maintain(DAY_ENDED + dt.timedelta(seconds=GRACE), 30, GRACE)
    assert done.gzipped == [lp(tmp_path)]
    assert names(tmp_path) == ["usage_tracking-2026-11-20.lp.gz", "usage_tracking-2026-11-21.lp"]
    assert gunzip(gz(tmp_path)) == original  # header lines included: importable as is
    # nothing left to do: a second run is a no-op
    again = maintain_raw_files(tmp_path, DAY_ENDED + dt.timedelta(seconds=GRACE), 30)
    assert again.gzipped == [] and gunzip(gz(tmp_path)) == original


def test_a_point_for_an_already_gzipped_day_is_kept(
    influxd, tmp_path: Path, make_point: Factory
) -> None:
    database = f"retention_{os.getpid()}"
    writer = FileWriter(tmp_path, database=database)
    first = write(writer, make_point(request_id="r-1", event_ms=DAY_MS))
    writer.maintain(DAY_ENDED + dt.timedelta(days=1), 30)
    assert names(tmp_path) == ["usage_tracking-2026-11-20.lp.gz"]

    # a late point for that day: a fresh .lp, with the header, beside the .gz
    late = write(writer, make_point(request_id="r-2", event_ms=DAY_MS + 5))
    assert lp(tmp_path).read_bytes() == writer.header + (late[0] + "\n").encode()
    result = writer.maintain(DAY_ENDED + dt.timedelta(days=1), 30)
    assert result.gzipped == [lp(tmp_path)]
    assert names(tmp_path) == ["usage_tracking-2026-11-20.lp.gz"]

    text = gunzip(gz(tmp_path))  # two gzip members, one stream
    assert (
        text
        == writer.header + (first[0] + "\n").encode() + writer.header + (late[0] + "\n").encode()
    )
    assert data_lines(text) == first + late

    influxd.create_database(database)
    status, body = influxd.write(database, text)  # `gzip -dc FILE | curl --data-binary @-`
    assert status == 204, body
    assert {row["request_id"] for row in influxd.rows(database)} == {"r-1", "r-2"}


def test_files_are_deleted_after_the_retention(tmp_path: Path, make_point: Factory) -> None:
    writer = FileWriter(tmp_path)
    write(writer, make_point(event_ms=DAY_MS))
    writer.maintain(DAY_ENDED + dt.timedelta(days=2), 30)
    write(writer, make_point(event_ms=DAY_MS))  # a late .lp beside the .gz
    write(writer, make_point(event_ms=NEXT_DAY_MS))
    expires = DAY_ENDED + dt.timedelta(days=30)

    kept = writer.maintain(expires - SECOND, 30)
    assert kept.deleted == []
    assert names(tmp_path) == [
        "usage_tracking-2026-11-20.lp.gz",
        "usage_tracking-2026-11-21.lp.gz",
    ]
    write(writer, make_point(event_ms=DAY_MS))  # and yet another late one

    result = writer.maintain(expires, 30)
    assert sorted(result.deleted) == [lp(tmp_path), gz(tmp_path)]
    assert names(tmp_path) == ["usage_tracking-2026-11-21.lp.gz"]  # one day younger


def test_zero_retention_keeps_files_for_ever(tmp_path: Path, make_point: Factory) -> None:
    writer = FileWriter(tmp_path)
    lines = write(writer, make_point(event_ms=DAY_MS))
    result = writer.maintain(DAY_ENDED + dt.timedelta(days=10_000), 0)
    assert result.deleted == []
    assert data_lines(gunzip(gz(tmp_path))) == lines


def test_leftovers_of_a_crashed_run_are_finished_without_loss_or_duplicates(
    tmp_path: Path, make_point: Factory
) -> None:
    writer = FileWriter(tmp_path)
    now = DAY_ENDED + dt.timedelta(days=1)

    # crash while writing the .tmp: the .tmp is garbage, the .lp is intact
    lines = write(writer, make_point(event_ms=DAY_MS))
    original = lp(tmp_path).read_bytes()
    tmp = gz(tmp_path).with_name(gz(tmp_path).name + ".tmp")
    tmp.write_bytes(gzip.compress(original)[:7])
    maintain_raw_files(tmp_path, now, 30)
    assert names(tmp_path) == ["usage_tracking-2026-11-20.lp.gz"]
    assert gunzip(gz(tmp_path)) == original

    # crash after the .lp was moved aside, before its member was written; a new .lp since
    aside = lp(tmp_path).with_name(lp(tmp_path).name + ".gzipping")
    moved = write(writer, make_point(event_ms=DAY_MS))
    os.rename(lp(tmp_path), aside)
    newer = write(writer, make_point(event_ms=DAY_MS))
    result = maintain_raw_files(tmp_path, now, 30)
    assert result.gzipped == [aside, lp(tmp_path)]
    assert names(tmp_path) == ["usage_tracking-2026-11-20.lp.gz"]
    assert data_lines(gunzip(gz(tmp_path))) == lines + moved + newer

    # crash after the .gz was replaced, before the moved-aside source was unlinked
    last = write(writer, make_point(event_ms=DAY_MS))
    source = lp(tmp_path).read_bytes()
    maintain_raw_files(tmp_path, now, 30)
    complete = gunzip(gz(tmp_path))
    aside.write_bytes(source)
    maintain_raw_files(tmp_path, now, 30)
    assert names(tmp_path) == ["usage_tracking-2026-11-20.lp.gz"]
    assert gunzip(gz(tmp_path)) == complete  # not appended twice
    assert data_lines(complete) == lines + moved + newer + last


def test_a_torn_last_line_is_left_out(tmp_path: Path, make_point: Factory) -> None:
    writer = FileWriter(tmp_path)
    lines = write(writer, make_point(event_ms=DAY_MS))
    with lp(tmp_path).open("ab") as file:  # a crash in the middle of an unacknowledged write
        file.write(to_line(make_point(event_ms=DAY_MS)).encode()[:30])
    maintain_raw_files(tmp_path, DAY_ENDED + dt.timedelta(days=1), 30)
    assert gunzip(gz(tmp_path)) == writer.header + (lines[0] + "\n").encode()


def test_concurrent_writers_never_lose_a_line(tmp_path: Path, make_point: Factory) -> None:
    """Two writers (as two worker processes: separate FileWriters, separate fds) append
    to the same day while maintenance keeps gzipping it: every line ends up in the .gz
    exactly once, each writer's lines in their order."""
    writers = [FileWriter(tmp_path), FileWriter(tmp_path)]
    written: list[list[str]] = [[], []]
    stop = threading.Event()

    def append(index: int) -> None:
        for batch in range(1000):
            points = [
                make_point(request_id=f"w{index}-{batch}-{i}", event_ms=DAY_MS) for i in range(3)
            ]
            written[index] += write(writers[index], *points)
        stop.set()

    threads = [threading.Thread(target=append, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    gzipped = 0
    while not stop.is_set() or any(t.is_alive() for t in threads):
        gzipped += len(maintain_raw_files(tmp_path, DAY_ENDED + dt.timedelta(days=1), 0).gzipped)
    for thread in threads:
        thread.join()
    maintain_raw_files(tmp_path, DAY_ENDED + dt.timedelta(days=1), 0)

    assert gzipped > 1  # maintenance really raced the writers
    assert names(tmp_path) == ["usage_tracking-2026-11-20.lp.gz"]
    found = data_lines(gunzip(gz(tmp_path)))
    assert sorted(found) == sorted(written[0] + written[1])
    for index in (0, 1):
        assert [line for line in found if f"w{index}-" in line] == written[index]


def test_a_second_maintenance_run_backs_off(tmp_path: Path, make_point: Factory) -> None:
    writer = FileWriter(tmp_path)
    write(writer, make_point(event_ms=DAY_MS))
    with (tmp_path / LOCK_NAME).open("a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        result = maintain_raw_files(tmp_path, DAY_ENDED + dt.timedelta(days=1), 30)
    assert result.busy and result.gzipped == []
    assert names(tmp_path) == ["usage_tracking-2026-11-20.lp"]


def test_missing_directory_and_naive_time(tmp_path: Path) -> None:
    assert maintain_raw_files(tmp_path / "nope", DAY_ENDED, 30).gzipped == []
    with pytest.raises(ValueError, match="timezone-aware"):
        maintain_raw_files(tmp_path, dt.datetime(2026, 11, 22), 30)
