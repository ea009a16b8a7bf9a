"""The replay's dedupe file: removed by its replay, or by the next one when its replay was
killed, never while its replay runs (tables/summary_db/replay_staging.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tables.summary_db import replay_staging
from tables.summary_db.replay_staging import BilledEvent, DayTotals, ReplayStaging, sweep_abandoned
from tables.summary_db.summary_store import SummaryRow
from tests.harness import REPO

_KILLED = """
import os, signal, sys
from pathlib import Path
from tables.summary_db.replay_staging import ReplayStaging
staging = ReplayStaging(Path(sys.argv[1]))
print(staging.path, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def event(request_id: str) -> BilledEvent:
    return BilledEvent(request_id, "2026-11-26", 740_000, "org", "user", "m", 1, 2, 3, 0, 0, 0, 0)


def staging_dirs(directory: Path) -> set[Path]:
    return set(directory.glob(".replay-*"))


def test_a_killed_replays_file_goes_with_the_next_replay_and_a_running_ones_stays(
    tmp_path: Path,
) -> None:
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED, str(tmp_path)],
        capture_output=True,
        cwd=REPO,
        timeout=60,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    dead = Path(killed.stdout.decode().strip()).parent
    assert dead.is_dir() and staging_dirs(tmp_path) == {dead}
    creating = tmp_path / ".replay-being-created"  # no owner lock yet: not judged
    creating.mkdir()

    running = ReplayStaging(tmp_path)
    try:
        assert not dead.exists()  # swept when the next replay started
        assert creating.is_dir()
        assert len(running.add([event("a"), event("b"), event("a")])) == 2
        # another replay starting now (another date) leaves the running one alone
        with ReplayStaging(tmp_path) as other:
            assert staging_dirs(tmp_path) == {running.path.parent, other.path.parent, creating}
        assert sweep_abandoned(tmp_path) == []
        assert len(running.add([event("c"), event("b")])) == 1
        assert running.unique == 3
    finally:
        running.close()
    assert staging_dirs(tmp_path) == {creating}


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["r1", "r2", 'r"3\\', "r\x004", "żółw-5"]),
            st.sampled_from(["org", 'o"rg\\', "org\x00", "żółw", "a\nb"]),
            st.integers(0, 10**12),
            st.integers(0, 10**15),
        ),
        max_size=25,
    )
)
def test_staging_keeps_the_first_copy_of_each_request_exactly(
    tmp_path_factory: pytest.TempPathFactory, rows: list[tuple[str, str, int, int]]
) -> None:
    """Ids go to SQLite as JSON (an escaped NUL falls back to bound values): the first
    copy of each request wins, within a call and across calls, the ids stored are the
    same strings, and the fold of the first copies is their exact sums per key."""
    entries = [
        BilledEvent(rid, "2026-11-26", 740_000, org, "user", "m", tokens, 2, cost, i % 2, 0, i, i)
        for i, (rid, org, tokens, cost) in enumerate(rows)
    ]
    totals = DayTotals()
    with ReplayStaging(tmp_path_factory.mktemp("staging")) as staging:
        cut = len(entries) // 3
        new = []
        for part in (entries[:cut], entries[cut : 2 * cut], entries[2 * cut :]):
            added = staging.add(part)
            totals.add(added)
            new += added
        stored = {row[0] for row in staging._conn.execute("SELECT request_id FROM seen")}
    first: dict[str, BilledEvent] = {}
    for entry in entries:
        first.setdefault(entry.request_id, entry)
    assert new == list(first.values())  # the first copies, in read order
    assert len(new) == staging.unique and staging.read == len(entries)
    assert stored == set(first)
    expected: dict[tuple[str, str, str], list[int]] = {}
    for e in first.values():
        sums = expected.setdefault((e.client_org_id, e.user_id, e.model), [0, 0, 0, 0, 0])
        for i, value in enumerate(
            (e.input_tokens, e.output_tokens, 1, e.cost_estimated, e.cost_nano)
        ):
            sums[i] += value
    assert sorted(totals.rows("2026-11-26")) == sorted(
        SummaryRow(*key, "2026-11-26", *sums) for key, sums in expected.items()
    )


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.sampled_from(["a", "b", 'c"\\', "d\x00", "żółw", "f", "g"]), max_size=40),
    st.integers(0, 8),
    st.integers(1, 7),
)
def test_ids_in_memory_then_spilled_keep_the_first_copy_like_the_file_alone(
    tmp_path_factory: pytest.TempPathFactory, ids: list[str], memory_ids: int, step: int
) -> None:
    """In memory up to ``memory_ids`` ids, then in the file (the set spilled): the same
    first copies, in every call, as the file alone, and every id seen ends up stored."""
    directory = tmp_path_factory.mktemp("staging")
    calls = [ids[start : start + step] for start in range(0, len(ids), step)]
    with ReplayStaging(directory) as alone, ReplayStaging(directory, memory_ids) as mixed:
        for call in calls:
            assert mixed.first_copies(call) == alone.first_copies(call)
        assert (mixed.read, mixed.unique) == (alone.read, alone.unique) == (len(ids), len(set(ids)))
        if mixed.spilled:
            stored = {row[0] for row in mixed._conn.execute("SELECT request_id FROM seen")}
            assert stored == set(ids)
        else:
            assert len(set(ids)) <= memory_ids


def test_the_fold_of_flagged_events_is_the_fold_of_their_ledger_entries() -> None:
    entries = [
        BilledEvent(
            f"r{i}", "2026-11-26", 740_000, f"o{i % 3}", "u", "m", i, 2 * i, 10 * i, i % 2, 0, 0, i
        )
        for i in range(20)
    ]
    fresh = [i % 4 != 1 for i in range(20)]
    flagged = DayTotals()
    flagged.add_events(
        entries, [e.cost_nano for e in entries], [e.cost_estimated for e in entries], fresh
    )
    plain = DayTotals()
    plain.add(e for e, first in zip(entries, fresh, strict=True) if first)
    merged = DayTotals()
    merged.add_sums(plain.sums())
    assert sorted(flagged.rows("d")) == sorted(plain.rows("d")) == sorted(merged.rows("d"))
    assert len(flagged) == 3


_NAMES = st.sampled_from(["a", "b", "żółw", 'q"\\', "d\x00", "long-" * 20])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            _NAMES,
            _NAMES,
            _NAMES,
            st.integers(0, 10**12),
            st.integers(0, 10**12),
            st.integers(0, 10**15),
            st.booleans(),
        ),
        max_size=60,
    ),
    st.integers(1, 9),
    st.integers(1, 5),
)
def test_the_columnar_fold_is_the_exact_sum_per_key_through_chunks_and_json(
    rows: list[tuple[str, str, str, int, int, int, bool]],
    step: int,
    chunk: int,
) -> None:
    """Folded batch by batch (and folded again and again: tiny thresholds), sent as JSON
    chunks and added up by another fold: the same exact sums per key as a plain dict."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(replay_staging, "_FOLD_AT_LEAST", 2)
        patch.setattr(replay_staging, "SUMS_PER_CHUNK", chunk)
        _fold_and_compare(rows, step, chunk)


def _fold_and_compare(
    rows: list[tuple[str, str, str, int, int, int, bool]], step: int, chunk: int
) -> None:
    events = [
        BilledEvent(f"r{i}", "d", 1, org, user, model, inp, out, cost, i % 2, 0, 0, i)
        for i, (org, user, model, inp, out, cost, _) in enumerate(rows)
    ]
    fresh = [first for *_, first in rows]
    totals = DayTotals()
    for start in range(0, len(events), step):
        part = slice(start, start + step)
        totals.add_events(
            events[part],
            [e.cost_nano for e in events[part]],
            [e.cost_estimated for e in events[part]],
            fresh[part],
        )
    expected: dict[tuple[str, str, str], list[int]] = {}
    for e, first in zip(events, fresh, strict=True):
        if first:
            sums = expected.setdefault((e.client_org_id, e.user_id, e.model), [0, 0, 0, 0, 0])
            for i, value in enumerate(
                (e.input_tokens, e.output_tokens, 1, e.cost_estimated, e.cost_nano)
            ):
                sums[i] += value
    want = sorted(SummaryRow(*key, "d", *sums) for key, sums in expected.items())
    assert sorted(totals.rows("d")) == want and len(totals) == len(want)
    chunks = totals.sums()
    assert all(len(c["sums"][0]) <= chunk for c in chunks)
    sent = [orjson.loads(orjson.dumps(c, option=orjson.OPT_SERIALIZE_NUMPY)) for c in chunks]
    merged = DayTotals()
    merged.add_sums(sent[::2])
    merged.add_sums(sent[1::2])
    assert sorted(merged.rows("d")) == want


def test_sums_past_64_bits_stay_exact() -> None:
    """A column whose sums could overflow int64 is summed as Python integers (and sent
    as such: orjson writes integers up to 2**64 - 1, as it did the former rows)."""
    big = 2**62
    totals = DayTotals()
    totals.add_sums(
        [
            {"names": [["o"], ["u"], ["m"]], "keys": [[0], [0], [0]], "sums": [[big]] * 5},
            {"names": [["o"], ["u"], ["m"]], "keys": [[0], [0], [0]], "sums": [[big + 5]] * 5},
        ]
    )
    assert totals.rows("d") == [SummaryRow("o", "u", "m", "d", *[2 * big + 5] * 5)]
    again = DayTotals()
    again.add_sums(orjson.loads(orjson.dumps(totals.sums(), option=orjson.OPT_SERIALIZE_NUMPY)))
    assert again.rows("d") == totals.rows("d")
    again.add_sums(
        [{"names": [["o"], ["u"], ["m"]], "keys": [[0], [0], [0]], "sums": [[2**70]] * 5}]
    )
    assert again.rows("d") == [SummaryRow("o", "u", "m", "d", *[2 * big + 5 + 2**70] * 5)]
    # and past orjson's 64 bits, between processes too (as decimal text)
    sent = orjson.loads(orjson.dumps(again.sums(), option=orjson.OPT_SERIALIZE_NUMPY))
    third = DayTotals()
    third.add_sums(sent)
    assert third.rows("d") == again.rows("d")
