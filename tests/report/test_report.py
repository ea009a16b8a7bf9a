"""``usage-stream report`` against hand-computed totals, on real SQLite files built with the
real schema (``tables.summary_db.schema.connect``) and rows inserted here, through the real command
(``python -m agents report`` in a child process: exit codes and stderr as an operator
sees them).

The expected amounts below were computed by hand from the inserted nano integers; they are
constants on purpose, not recomputed with the code under test.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import os
import sqlite3
import subprocess
import sys
from datetime import date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import orjson
import pytest

from tables.summary_db.schema import connect
from tests.harness import REPO

QUOTED_CLIENT = 'Zakład "Łódź", S.A.'  # comma, quotes and non-ASCII: CSV quoting and UTF-8

# (client, user, model, date, input, output, total, requests, estimated, raw_nano,
#  markup_nano, pln_nano, rate, table_no)
MARCH_ROWS = [
    ("org-1", "alice", "openai/gpt-4o-mini", "2025-03-03", 1000, 500, 1500, 10, 2,
     1_234_567_891, 1_604_938_258, 6_439_493_773, "4.0123", "043/A/NBP/2025"),
    ("org-1", "alice", "openai/gpt-4o-mini", "2025-03-04", 2000, 100, 2100, 5, 0,
     500_000_000, 650_000_000, 2_591_940_000, "3.9876", "044/A/NBP/2025"),
    ("org-1", "bob", "anthropic/claude-3.5-sonnet", "2025-03-04", 300, 700, 1000, 3, 1,
     9_999_999_999, 12_999_999_999, 51_838_799_996, "3.9876", "044/A/NBP/2025"),
    # 2025-03-31 still waits for its NBP rate
    ("org-1", "bob", "anthropic/claude-3.5-sonnet", "2025-03-31", 10, 20, 30, 1, 0,
     7, 9, None, None, None),
    (QUOTED_CLIENT, "carol", "openai/gpt-4o-mini", "2025-03-15", 5, 6, 11, 1, 1,
     100, 130, 519, "3.9900", "051/A/NBP/2025"),
    # outside March: must not be counted
    ("org-1", "alice", "openai/gpt-4o-mini", "2025-02-28", 99_999, 1, 100_000, 50, 0,
     77_000_000_000, 100_100_000_000, 400_000_000_000, "4.0000", "040/A/NBP/2025"),
    ("org-1", "alice", "openai/gpt-4o-mini", "2025-04-01", 88_888, 1, 88_889, 40, 0,
     66_000_000_000, 85_800_000_000, 340_000_000_000, "3.9000", "063/A/NBP/2025"),
]  # fmt: skip

# the columns after the amounts tell statement lines from adjustment lines
STATEMENT_LINE = {
    "line": "statement",
    "adjustment_id": "",
    "usage_date": "",
    "reason": "",
    "statement_month": "",
    "recorded_at": "",
}
# org-1 in March 2025, by hand: 10+5+3+1 requests, 1_234_567_891+500_000_000+9_999_999_999+7
# raw nano, 1_604_938_258+650_000_000+12_999_999_999+9 markup nano; PLN pending (03-31).
ORG1 = {
    "usage_month": "2025-03",
    "client_org_id": "org-1",
    "requests": "19",
    "estimated_requests": "3",
    "input_tokens": "3310",
    "output_tokens": "1320",
    "total_tokens": "4630",
    "raw_cost_usd": "11.734567897",
    "markup_cost_usd": "15.254938266",
    "markup_cost_pln": "",
    "usd_pln_rate": "4.0123 3.9876",
    "nbp_table_no": "043/A/NBP/2025 044/A/NBP/2025",
    "final": "1",
    "provisional_dates": "",
    "pln_pending_dates": "2025-03-31",
    **STATEMENT_LINE,
}
QUOTED = {
    "usage_month": "2025-03",
    "client_org_id": QUOTED_CLIENT,
    "requests": "1",
    "estimated_requests": "1",
    "input_tokens": "5",
    "output_tokens": "6",
    "total_tokens": "11",
    "raw_cost_usd": "0.000000100",
    "markup_cost_usd": "0.000000130",
    "markup_cost_pln": "0.000000519",
    "usd_pln_rate": "3.9900",
    "nbp_table_no": "051/A/NBP/2025",
    "final": "1",
    "provisional_dates": "",
    "pln_pending_dates": "",
    **STATEMENT_LINE,
}
HEADER = list(ORG1)


def build_db(path: Path, rows: list[tuple], live: list[tuple[tuple, int]] | None) -> Path:
    """A summary DB migrated by the worker's own code, with ``rows`` in ``usage_daily``.

    ``live=None``: an older DB without ``usage_daily_live``. Otherwise ``usage_daily_live``
    is (re)created as a table with the contract's columns (usage_daily's plus ``final``)
    holding the closed rows (final 1) and these extra rows with their ``final``, so the
    test does not depend on how the worker maintains it.
    """

    async def migrate() -> None:
        conn = await connect(path)
        await conn.close()

    asyncio.run(migrate())
    db = sqlite3.connect(path, isolation_level=None)
    try:
        kind = db.execute(
            "SELECT type FROM sqlite_master WHERE name = 'usage_daily_live'"
        ).fetchone()
        if kind is not None:
            db.execute(f"DROP {kind[0].upper()} usage_daily_live")
        columns = (
            "client_org_id, user_id, model, usage_date, input_tokens, output_tokens,"
            " total_tokens, requests, estimated_requests, raw_cost_nano, markup_cost_nano,"
            " markup_cost_pln_nano, usd_pln_rate, nbp_table_no, raw_cost_usd,"
            " markup_cost_usd, markup_cost_pln, revision, updated_at"
        )

        def full(row: tuple) -> tuple:
            raw, markup, pln = row[9], row[10], row[11]
            return (
                *row,
                raw / 1e9,
                markup / 1e9,
                None if pln is None else pln / 1e9,
                1,
                "2025-04-01T00:00:00.000000Z",
            )

        db.executemany(
            f"INSERT INTO usage_daily ({columns}) VALUES ({','.join('?' * 19)})",
            [full(row) for row in rows],
        )
        if live is not None:
            db.execute("CREATE TABLE usage_daily_live AS SELECT *, 1 AS final FROM usage_daily")
            db.executemany(
                f"INSERT INTO usage_daily_live ({columns}, final) VALUES ({','.join('?' * 20)})",
                [(*full(row), final) for row, final in live],
            )
    finally:
        db.close()
    return path


@pytest.fixture
def march_db(tmp_path: Path) -> Path:
    return build_db(tmp_path / "usage.db", MARCH_ROWS, live=None)


def run_report(db: Path, *args: str, columns: int = 250) -> subprocess.CompletedProcess[bytes]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("INFLUXDB_", "KAFKA_"))},
        "SUMMARY_DB_PATH": str(db),
        "DATA_DIR": str(db.parent),
        "BUSINESS_TIMEZONE": "Europe/Warsaw",
        "COLUMNS": str(columns),
    }
    return subprocess.run(
        [sys.executable, "-m", "agents", "report", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        timeout=120,
    )


def ok(result: subprocess.CompletedProcess[bytes]) -> bytes:
    assert result.returncode == 0, result.stdout + result.stderr
    assert b"Traceback" not in result.stderr, result.stderr
    return result.stdout


def table_row(text: str, first_cell: str) -> list[str]:
    """The cells of the rich table row whose first cell is ``first_cell``."""
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("│┃").split("│")]
        if cells and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in:\n{text}")


def test_csv_is_spreadsheet_ready_and_matches_hand_computed_totals(march_db: Path) -> None:
    digest = hashlib.sha256(march_db.read_bytes()).hexdigest()
    out = ok(run_report(march_db, "--month", "2025-03", "--format", "csv"))
    text = out.decode("utf-8")  # UTF-8, as a spreadsheet expects
    assert text.endswith("\r\n") and "\r\n" in text.rstrip("\r\n")  # RFC 4180 records
    assert '"Zakład ""Łódź"", S.A."' in text  # quoted field, doubled quotes
    reader = csv.reader(io.StringIO(text, newline=""))
    assert next(reader) == HEADER
    parsed = [dict(zip(HEADER, row, strict=True)) for row in reader]
    assert parsed == [QUOTED, ORG1]  # by client_org_id ("Z" < "o"); no total rows in CSV
    # a statement never writes to the DB it states
    assert hashlib.sha256(march_db.read_bytes()).hexdigest() == digest


def test_client_filter_keeps_one_client(march_db: Path) -> None:
    out = ok(
        run_report(march_db, "--month", "2025-03", "--client", QUOTED_CLIENT, "--format", "csv")
    )
    rows = list(csv.DictReader(io.StringIO(out.decode(), newline="")))
    assert rows == [QUOTED]


def test_detail_json_has_exact_strings_rates_and_pending_days(march_db: Path) -> None:
    out = ok(run_report(march_db, "--month", "2025-03", "--detail", "--format", "json"))
    doc = orjson.loads(out)
    assert doc["usage_month"] == "2025-03" and doc["final"] == 1 and doc["open_dates"] == []
    assert doc["source"] == "usage_daily"
    assert [line["client_org_id"] for line in doc["clients"]] == [QUOTED_CLIENT, "org-1"]
    org1 = doc["clients"][1]
    assert org1["raw_cost_usd"] == "11.734567897"
    assert org1["markup_cost_usd"] == "15.254938266"
    assert org1["markup_cost_pln"] is None  # not a partial sum: 2025-03-31 has no rate
    assert org1["pln_pending_dates"] == ["2025-03-31"]
    assert org1["requests"] == 19 and org1["total_tokens"] == 4630
    assert org1["rates"] == [
        {
            "usd_pln_rate": "4.0123",
            "nbp_table_no": "043/A/NBP/2025",
            "usage_dates": ["2025-03-03"],
            "markup_cost_usd": "1.604938258",
            "markup_cost_pln": "6.439493773",
        },
        {
            "usd_pln_rate": "3.9876",
            "nbp_table_no": "044/A/NBP/2025",
            "usage_dates": ["2025-03-04"],
            "markup_cost_usd": "13.649999999",  # 650_000_000 + 12_999_999_999
            "markup_cost_pln": "54.430739996",  # 2_591_940_000 + 51_838_799_996
        },
    ]
    detail = {
        (line["client_org_id"], line["user_id"], line["model"]): line for line in doc["detail"]
    }
    assert list(detail) == [
        (QUOTED_CLIENT, "carol", "openai/gpt-4o-mini"),
        ("org-1", "alice", "openai/gpt-4o-mini"),
        ("org-1", "bob", "anthropic/claude-3.5-sonnet"),
    ]
    alice = detail["org-1", "alice", "openai/gpt-4o-mini"]
    assert (alice["requests"], alice["estimated_requests"]) == (15, 2)
    assert (alice["input_tokens"], alice["output_tokens"], alice["total_tokens"]) == (
        3000,
        600,
        3600,
    )
    assert alice["raw_cost_usd"] == "1.734567891"
    assert alice["markup_cost_usd"] == "2.254938258"
    assert alice["markup_cost_pln"] == "9.031433773"  # 6_439_493_773 + 2_591_940_000
    assert alice["usd_pln_rate"] == "4.0123 3.9876" and alice["pln_pending_dates"] == []
    bob = detail["org-1", "bob", "anthropic/claude-3.5-sonnet"]
    assert bob["raw_cost_usd"] == "10.000000006" and bob["markup_cost_usd"] == "13.000000008"
    assert bob["markup_cost_pln"] is None and bob["pln_pending_dates"] == ["2025-03-31"]
    assert bob["usd_pln_rate"] == "3.9876"


def test_table_has_a_total_row_per_client_and_flags_pending_pln(march_db: Path) -> None:
    out = ok(run_report(march_db, "--month", "2025-03", "--detail")).decode()
    assert "usage statement 2025-03 (final;" in out
    alice = table_row(out, "org-1")  # the first org-1 row: alice's line
    assert alice[1:3] == ["alice", "openai/gpt-4o-mini"]
    totals = [
        cells
        for line in out.splitlines()
        if (cells := [c.strip() for c in line.strip().strip("│").split("│")])[1:2] == ["total"]
    ]
    assert [cells[0] for cells in totals] == [QUOTED_CLIENT, "org-1"]
    org1 = totals[1]
    # requests … markup_cost_pln, usd_pln_rate, flags
    assert org1[3:] == [
        "19", "3", "3310", "1320", "4630", "11.734567897", "15.254938266", "pending",
        "4.0123 3.9876", "PLN pending: 2025-03-31",
    ]  # fmt: skip
    grand = table_row(out, "all clients")
    assert grand[3:10] == ["20", "4", "3315", "1326", "4641", "11.734567997", "15.254938396"]
    assert grand[10] == "pending"
    assert "USD/PLN rates used" in out
    rate_row = [r for r in out.splitlines() if "044/A/NBP/2025" in r][0]
    assert "2025-03-04" in rate_row and "13.649999999" in rate_row and "54.430739996" in rate_row
    assert "PLN pending for org-1: no NBP rate yet for 2025-03-31" in out


def test_a_narrow_table_becomes_blocks_and_never_cuts_an_amount(march_db: Path) -> None:
    out = ok(run_report(march_db, "--month", "2025-03", "--detail", columns=80)).decode()
    assert "…" not in out and "wider than 80 columns" in out
    assert max(len(line) for line in out.splitlines()) <= 80
    blocks = [line.split() for line in out.splitlines()]
    assert ["raw_cost_usd", "11.734567897"] in blocks  # org-1's total, exact
    assert ["markup_cost_usd", "15.254938396"] in blocks  # all clients
    assert ["flags", "PLN", "pending:", "2025-03-31"] in blocks


def test_open_days_from_usage_daily_live_are_included_and_flagged(tmp_path: Path) -> None:
    closed = ("org-7", "dave", "openai/gpt-4o-mini", "2025-05-30", 100, 50, 150, 2, 0,
              2_000_000_000, 2_600_000_000, 10_400_000_000, "4.0000", "104/A/NBP/2025")  # fmt: skip
    provisional = ("org-7", "dave", "openai/gpt-4o-mini", "2025-05-31", 10, 5, 15, 1, 0,
                   300_000_000, 390_000_000, None, None, None)  # fmt: skip
    db = build_db(tmp_path / "usage.db", [closed], live=[(provisional, 0)])
    doc = orjson.loads(ok(run_report(db, "--month", "2025-05", "--format", "json")))
    assert doc["source"] == "usage_daily_live"
    assert doc["final"] == 0 and doc["open_dates"] == ["2025-05-31"]
    (org7,) = doc["clients"]
    assert org7["final"] == 0 and org7["provisional_dates"] == ["2025-05-31"]
    assert org7["requests"] == 3 and org7["total_tokens"] == 165
    assert org7["raw_cost_usd"] == "2.300000000" and org7["markup_cost_usd"] == "2.990000000"
    assert org7["markup_cost_pln"] is None and org7["pln_pending_dates"] == ["2025-05-31"]
    table = ok(run_report(db, "--month", "2025-05")).decode()
    assert "usage statement 2025-05 (NOT FINAL;" in table
    assert "provisional: 2025-05-31" in table_row(table, "org-7")[-1]
    assert "not final: 2025-05-31 not closed yet (provisional rows included" in table


def test_older_db_without_live_rows_names_the_days_with_no_closed_data(tmp_path: Path) -> None:
    today = datetime.now(ZoneInfo("Europe/Warsaw")).date()
    first = today.replace(day=1)
    row = ("org-8", "erin", "openai/gpt-4o-mini", first.isoformat(), 1, 1, 2, 1, 0,
           1, 1, 4, "4.0000", "001/A/NBP/2026")  # fmt: skip
    db = build_db(tmp_path / "usage.db", [row], live=None)
    pending = sqlite3.connect(db)
    with pending:  # recorded but not rolled up yet: no closed data for the 1st either
        pending.execute(  # the worker's table in DBs of that age (later schemas drop it)
            "CREATE TABLE IF NOT EXISTS rollup_pending (usage_date TEXT, client_org_id TEXT,"
            " user_id TEXT, model TEXT)"
        )
        pending.execute(
            "INSERT INTO rollup_pending VALUES (?, 'org-8', 'erin', 'm')", (first.isoformat(),)
        )
    pending.close()
    month = first.strftime("%Y-%m")
    doc = orjson.loads(ok(run_report(db, "--month", month, "--format", "json")))
    assert doc["source"] == "usage_daily" and doc["final"] == 0
    following = (first + timedelta(days=32)).replace(day=1)
    rest = [
        (today + timedelta(days=n)).isoformat() for n in range((following - today).days)
    ]  # today is not over: it and every later day of the month have no closed data
    assert doc["open_dates"] == sorted({first.isoformat(), *rest})
    assert doc["clients"][0]["final"] == 0 and doc["clients"][0]["provisional_dates"] == []
    table = ok(run_report(db, "--month", month)).decode()
    assert "no closed data for these days yet" in table and today.isoformat() in table


def test_a_key_twice_in_usage_daily_live_is_refused_not_summed(tmp_path: Path) -> None:
    closed = ("org-7", "dave", "openai/gpt-4o-mini", "2025-05-30", 100, 50, 150, 2, 0,
              2_000_000_000, 2_600_000_000, 10_400_000_000, "4.0000", "104/A/NBP/2025")  # fmt: skip
    db = build_db(tmp_path / "usage.db", [closed], live=[(closed, 0)])
    result = run_report(db, "--month", "2025-05")
    lines = result.stderr.decode().splitlines()
    assert result.returncode == 2 and result.stdout == b"", lines
    assert lines == [
        "usage-stream: summary DB "
        f"{db}: usage_daily_live has more than one row for"
        " org-7/dave/openai/gpt-4o-mini/2025-05-30: a statement would count it twice"
    ]


@pytest.mark.parametrize("month", ["2025-13", "2025-3", "march", "2025-03-01", ""])
def test_bad_month_is_one_line_exit_2(march_db: Path, month: str) -> None:
    result = run_report(march_db, "--month", month)
    assert result.returncode == 2 and result.stdout == b""
    assert result.stderr.decode().splitlines() == [
        f"usage-stream: bad --month {month!r}: expected YYYY-MM, e.g. 2026-11"
    ]


def test_nothing_to_state_is_one_line_exit_1(march_db: Path) -> None:
    cases = {
        ("--client", "org-404"): "usage-stream: unknown client 'org-404': no usage recorded",
        ("--client", QUOTED_CLIENT, "--month", "2025-04"): (
            f"usage-stream: no usage for client {QUOTED_CLIENT!r} in 2025-04"
            " (its latest usage: 2025-03)"
        ),
        ("--month", "2025-05"): "usage-stream: no usage in 2025-05",
    }
    for args, expected in cases.items():
        full = args if "--month" in args else ("--month", "2025-03", *args)
        result = run_report(march_db, *full)
        lines = result.stderr.decode().splitlines()
        assert result.returncode == 1 and result.stdout == b"", lines
        assert len(lines) == 1 and lines[0].startswith(expected), lines


def test_unreadable_db_is_one_line_exit_2(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database, just text\n" * 100)
    other = tmp_path / "other.db"
    plain = sqlite3.connect(other)
    plain.executescript("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
    plain.close()
    missing = tmp_path / "missing" / "usage.db"
    for db, expected in (
        (missing, "does not exist"),
        (garbage, "is not readable"),
        (other, "is not a usage-stream summary DB"),
    ):
        result = run_report(db, "--month", "2025-03")
        lines = result.stderr.decode().splitlines()
        assert result.returncode == 2 and result.stdout == b"", lines
        assert len(lines) == 1 and expected in lines[0] and "Traceback" not in lines[0], lines
    assert not missing.parent.exists()  # a report never creates a DB


def test_month_bounds_cover_december() -> None:
    from tables.summary_db.report_queries import month_bounds

    assert month_bounds(date(2025, 12, 1)) == ("2025-12-01", "2026-01-01")
    assert month_bounds(date(2025, 2, 1)) == ("2025-02-01", "2025-03-01")
