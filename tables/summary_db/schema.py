"""The SQLite schema (docs/contract.md §3) and its forward-only migrations.

Each migration is a list of statements applied in one transaction and recorded in
``schema_migrations``; start-up applies the ones missing. To evolve the schema, append a
new ``(version, statements)`` pair to :data:`MIGRATIONS`; never edit a released one.

``source_offsets`` (migration 3) is empty in the scale-out design but kept: it is the
upgrade path from the single-file design, which stored each usage partition's next offset
there. :func:`agents.summary_writer.writer.carry_over_offsets` reads it to start every batch-log
chain where that design stopped, so nothing it billed is billed again. The rest of that
design's per-event ledger (``ledger``, ``ledger_buckets``, the ``ledger_events`` view)
is dropped by migration 6.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from weakref import WeakKeyDictionary

import aiosqlite

from tables.summary_db.schema_billing import BILLING_MIGRATIONS

__all__ = [
    "MIGRATIONS",
    "connect",
    "json_for_sqlite",
    "migrate",
    "open_sync",
    "utc_now_text",
    "write_transaction",
]

_SUMMED = """
    SUM(input_tokens) AS input_tokens,
    SUM(output_tokens) AS output_tokens,
    SUM(total_tokens) AS total_tokens,
    SUM(requests) AS requests,
    SUM(estimated_requests) AS estimated_requests,
    SUM(raw_cost_nano) AS raw_cost_nano,
    SUM(markup_cost_nano) AS markup_cost_nano,
    CASE WHEN COUNT(markup_cost_pln_nano) = COUNT(*) THEN SUM(markup_cost_pln_nano) END
        AS markup_cost_pln_nano,
    SUM(raw_cost_nano) / 1e9 AS raw_cost_usd,
    SUM(markup_cost_nano) / 1e9 AS markup_cost_usd,
    CASE WHEN COUNT(markup_cost_pln_nano) = COUNT(*) THEN SUM(markup_cost_pln_nano) / 1e9 END
        AS markup_cost_pln,
"""

# Daily views carry the day's rate (one per usage date); the monthly view spans many rates.
_DAY_RATE = """
    CASE WHEN COUNT(usd_pln_rate) = COUNT(*) THEN MAX(usd_pln_rate) END AS usd_pln_rate,
    CASE WHEN COUNT(nbp_table_no) = COUNT(*) THEN MAX(nbp_table_no) END AS nbp_table_no,
    MAX(revision) AS revision,
    MAX(updated_at) AS updated_at
"""
_MONTH_RATE = """
    NULL AS usd_pln_rate,
    NULL AS nbp_table_no,
    MAX(revision) AS revision,
    MAX(updated_at) AS updated_at
"""


def _view(name: str, keys: str, group: str, rate: str = _DAY_RATE) -> str:
    return (
        f"CREATE VIEW {name} AS SELECT {keys}, {_SUMMED} {rate} FROM usage_daily GROUP BY {group}"
    )


MIGRATIONS: list[tuple[int, list[str]]] = [
    (
        1,
        [
            # The ledger: one row per unique request (membership). Daily totals are derived
            # from it, so a redelivered or replayed event cannot count twice.
            """CREATE TABLE usage_events (
                request_id TEXT PRIMARY KEY,
                usage_date TEXT NOT NULL,
                client_org_id TEXT NOT NULL,
                user_id TEXT NOT NULL,
                model TEXT NOT NULL,
                input_tokens INTEGER NOT NULL,
                output_tokens INTEGER NOT NULL,
                cost_nano INTEGER NOT NULL,
                cost_estimated INTEGER NOT NULL,
                event_ms INTEGER NOT NULL,
                source_topic TEXT NOT NULL,
                source_partition INTEGER NOT NULL,
                source_offset INTEGER NOT NULL,
                recorded_at TEXT NOT NULL
            ) WITHOUT ROWID""",
            "CREATE INDEX usage_events_by_day ON usage_events"
            " (usage_date, client_org_id, user_id, model)",
            # Summary keys whose ledger rows changed since their last rollup.
            """CREATE TABLE rollup_pending (
                usage_date TEXT NOT NULL,
                client_org_id TEXT NOT NULL,
                user_id TEXT NOT NULL,
                model TEXT NOT NULL,
                PRIMARY KEY (usage_date, client_org_id, user_id, model)
            ) WITHOUT ROWID""",
            # Days whose first close happened; events for them are late.
            """CREATE TABLE closed_days (
                usage_date TEXT PRIMARY KEY,
                closed_at TEXT NOT NULL,
                closed_by TEXT NOT NULL
            )""",
            """CREATE TABLE usage_daily (
                client_org_id TEXT NOT NULL,
                user_id TEXT NOT NULL,
                model TEXT NOT NULL,
                usage_date TEXT NOT NULL,
                input_tokens INTEGER NOT NULL,
                output_tokens INTEGER NOT NULL,
                total_tokens INTEGER NOT NULL,
                requests INTEGER NOT NULL,
                estimated_requests INTEGER NOT NULL,
                raw_cost_nano INTEGER NOT NULL,
                markup_cost_nano INTEGER NOT NULL,
                markup_cost_pln_nano INTEGER,
                raw_cost_usd REAL NOT NULL,
                markup_cost_usd REAL NOT NULL,
                markup_cost_pln REAL,
                usd_pln_rate TEXT,
                nbp_table_no TEXT,
                revision INTEGER NOT NULL DEFAULT 1,
                updated_at TEXT NOT NULL,
                PRIMARY KEY (client_org_id, user_id, model, usage_date)
            )""",
            "CREATE INDEX usage_daily_by_date ON usage_daily (usage_date)",
            _view(
                "client_daily_usage",
                "client_org_id, usage_date",
                "client_org_id, usage_date",
            ),
            _view(
                "client_user_daily_usage",
                "client_org_id, user_id, usage_date",
                "client_org_id, user_id, usage_date",
            ),
            _view(
                "client_model_daily_usage",
                "client_org_id, model, usage_date",
                "client_org_id, model, usage_date",
            ),
            _view(
                "client_monthly_usage",
                "client_org_id, substr(usage_date, 1, 7) AS usage_month",
                "client_org_id, substr(usage_date, 1, 7)",
                _MONTH_RATE,
            ),
            """CREATE TABLE nbp_rates (
                currency TEXT NOT NULL,
                effective_date TEXT NOT NULL,
                table_no TEXT NOT NULL,
                mid TEXT NOT NULL,
                fetched_at TEXT NOT NULL,
                PRIMARY KEY (currency, effective_date)
            )""",
            """CREATE TABLE model_pricing (
                model_id TEXT NOT NULL,
                prompt_usd_per_token TEXT NOT NULL,
                completion_usd_per_token TEXT NOT NULL,
                request_usd TEXT NOT NULL,
                fetched_at TEXT NOT NULL,
                PRIMARY KEY (model_id, fetched_at)
            )""",
            """CREATE TABLE batch_runs (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                kind TEXT NOT NULL CHECK (kind IN ('rollup', 'replay', 'refresh')),
                processing_date TEXT,
                started_at TEXT NOT NULL,
                finished_at TEXT,
                duration_seconds REAL,
                success INTEGER NOT NULL DEFAULT 0,
                records_processed INTEGER NOT NULL DEFAULT 0,
                summaries_written INTEGER NOT NULL DEFAULT 0,
                clients_processed INTEGER NOT NULL DEFAULT 0,
                data_corrections INTEGER NOT NULL DEFAULT 0,
                late_events INTEGER NOT NULL DEFAULT 0,
                error TEXT
            )""",
            "CREATE INDEX batch_runs_by_kind ON batch_runs (kind, id)",
            # Last outcome per reference-data source (nbp, openrouter), for /status.
            """CREATE TABLE refresh_status (
                source TEXT PRIMARY KEY,
                last_attempt_at TEXT,
                last_success_at TEXT,
                last_error TEXT
            )""",
        ],
    ),
    (
        2,
        [
            # Calendar days whose NBP table A status is known for a currency: a row in
            # nbp_rates, or a confirmed absence (weekend, holiday). A rate applies to usage
            # date D only when every day between it and D-1 is known, so a missing fetch is
            # never mistaken for a holiday.
            """CREATE TABLE nbp_coverage (
                currency TEXT NOT NULL,
                day TEXT NOT NULL,
                checked_at TEXT NOT NULL,
                PRIMARY KEY (currency, day)
            ) WITHOUT ROWID""",
        ],
    ),
    (
        3,
        [
            # The batched hot path. Per-event rows are kept only for LEDGER_RETENTION_DAYS
            # and daily totals are folded increments, no longer derived from membership.
            #
            # summary_keys: (client, user, model) once, so the ledger stores a small integer.
            """CREATE TABLE summary_keys (
                key_id INTEGER PRIMARY KEY,
                client_org_id TEXT NOT NULL,
                user_id TEXT NOT NULL,
                model TEXT NOT NULL,
                UNIQUE (client_org_id, user_id, model)
            )""",
            # ledger: one row per unique request_id recorded in the last
            # LEDGER_RETENTION_DAYS. It is the deduplication set (checked and extended in
            # the same transaction as the folded sums) and what a replay swaps. ``bucket``
            # is the wall-clock ms (floored to the retention bucket) when the request was
            # first recorded: pruning deletes whole key prefixes, without any extra index.
            # ``usage_day`` is the usage date's proleptic ordinal (date.toordinal()).
            """CREATE TABLE ledger (
                bucket INTEGER NOT NULL,
                request_id TEXT NOT NULL,
                usage_day INTEGER NOT NULL,
                key_id INTEGER NOT NULL,
                input_tokens INTEGER NOT NULL,
                output_tokens INTEGER NOT NULL,
                cost_nano INTEGER NOT NULL,
                cost_estimated INTEGER NOT NULL,
                source_partition INTEGER NOT NULL,
                source_offset INTEGER NOT NULL,
                PRIMARY KEY (bucket, request_id)
            ) WITHOUT ROWID""",
            "CREATE TABLE ledger_buckets (bucket INTEGER PRIMARY KEY)",
            # daily_pending: exact increments per summary key not yet in usage_daily (open
            # days, and late events of closed days until the next rollup pass).
            """CREATE TABLE daily_pending (
                usage_date TEXT NOT NULL,
                key_id INTEGER NOT NULL,
                input_tokens INTEGER NOT NULL,
                output_tokens INTEGER NOT NULL,
                requests INTEGER NOT NULL,
                estimated_requests INTEGER NOT NULL,
                raw_cost_nano INTEGER NOT NULL,
                late_events INTEGER NOT NULL DEFAULT 0,
                -- 1 while usage_daily_open does not show these totals yet
                live_dirty INTEGER NOT NULL DEFAULT 1,
                PRIMARY KEY (usage_date, key_id)
            ) WITHOUT ROWID""",
            # source_offsets: the next offset of each source partition, written in the
            # same transaction as the batch it ends; the consumer seeks here on assignment.
            """CREATE TABLE source_offsets (
                topic TEXT NOT NULL,
                partition INTEGER NOT NULL,
                next_offset INTEGER NOT NULL,
                updated_at TEXT NOT NULL,
                PRIMARY KEY (topic, partition)
            )""",
            # Carry an existing membership ledger over: its requests keep deduplicating,
            # and keys waiting for a rollup become increments against usage_daily.
            """INSERT OR IGNORE INTO summary_keys (client_org_id, user_id, model)
                SELECT DISTINCT client_org_id, user_id, model FROM usage_events""",
            """INSERT INTO daily_pending
                SELECT e.usage_date, k.key_id,
                    SUM(e.input_tokens) - COALESCE(MAX(d.input_tokens), 0),
                    SUM(e.output_tokens) - COALESCE(MAX(d.output_tokens), 0),
                    COUNT(*) - COALESCE(MAX(d.requests), 0),
                    SUM(e.cost_estimated) - COALESCE(MAX(d.estimated_requests), 0),
                    SUM(e.cost_nano) - COALESCE(MAX(d.raw_cost_nano), 0), 0, 1
                FROM usage_events e
                JOIN rollup_pending p ON p.usage_date = e.usage_date
                    AND p.client_org_id = e.client_org_id AND p.user_id = e.user_id
                    AND p.model = e.model
                JOIN summary_keys k ON k.client_org_id = e.client_org_id
                    AND k.user_id = e.user_id AND k.model = e.model
                LEFT JOIN usage_daily d ON d.usage_date = e.usage_date
                    AND d.client_org_id = e.client_org_id AND d.user_id = e.user_id
                    AND d.model = e.model
                GROUP BY e.usage_date, k.key_id""",
            """INSERT INTO ledger
                SELECT (CAST(strftime('%s', 'now') AS INTEGER) * 1000), e.request_id,
                    CAST(julianday(e.usage_date) - 1721424.5 AS INTEGER), k.key_id,
                    e.input_tokens, e.output_tokens, e.cost_nano, e.cost_estimated,
                    e.source_partition, e.source_offset
                FROM usage_events e JOIN summary_keys k USING (client_org_id, user_id, model)""",
            """INSERT OR IGNORE INTO ledger_buckets SELECT DISTINCT bucket FROM ledger""",
            "DROP TABLE usage_events",
            # The ledger as people read it (auditing, support): one row per request.
            """CREATE VIEW ledger_events AS
                SELECT l.request_id, date(l.usage_day + 1721424.5) AS usage_date,
                    k.client_org_id, k.user_id, k.model, l.input_tokens, l.output_tokens,
                    l.cost_nano, l.cost_estimated, l.source_partition, l.source_offset,
                    l.bucket AS recorded_before_ms
                FROM ledger l JOIN summary_keys k USING (key_id)""",
            "DROP TABLE rollup_pending",
            # Provisional rows of open days (rewritten by every rollup pass) and the live
            # view of docs/contract.md §3: closed days as in usage_daily (final = 1) plus these.
            """CREATE TABLE usage_daily_open (
                client_org_id TEXT NOT NULL,
                user_id TEXT NOT NULL,
                model TEXT NOT NULL,
                usage_date TEXT NOT NULL,
                input_tokens INTEGER NOT NULL,
                output_tokens INTEGER NOT NULL,
                total_tokens INTEGER NOT NULL,
                requests INTEGER NOT NULL,
                estimated_requests INTEGER NOT NULL,
                raw_cost_nano INTEGER NOT NULL,
                markup_cost_nano INTEGER NOT NULL,
                markup_cost_pln_nano INTEGER,
                raw_cost_usd REAL NOT NULL,
                markup_cost_usd REAL NOT NULL,
                markup_cost_pln REAL,
                usd_pln_rate TEXT,
                nbp_table_no TEXT,
                revision INTEGER NOT NULL DEFAULT 0,
                updated_at TEXT NOT NULL,
                PRIMARY KEY (client_org_id, user_id, model, usage_date)
            )""",
            """CREATE VIEW usage_daily_live AS
                SELECT *, 1 AS final FROM usage_daily
                UNION ALL
                SELECT *, 0 AS final FROM usage_daily_open""",
        ],
    ),
    (
        4,
        [
            # Scale-out (issue 9): the summary writer's place in each home partition's
            # batch log (streams/kafka/batch_log.py), stored in the transaction that adds the
            # sums of the records it read: a record below next_offset was applied (or
            # judged) already, and the chain head says which record the next valid one
            # must extend, and where the partition's workers have read up to.
            """CREATE TABLE batch_log_heads (
                partition INTEGER PRIMARY KEY,
                next_offset INTEGER NOT NULL,
                head_offset INTEGER NOT NULL,
                usage_next INTEGER NOT NULL,
                rerouted_next INTEGER NOT NULL,
                newest_event_ms INTEGER NOT NULL,
                updated_at TEXT NOT NULL
            )""",
        ],
    ),
    (
        5,
        [
            # Replays under scale-out: a replay appends a fence to every batch-log
            # partition; the summary writer waits at a fence until the replay that wrote
            # it is complete (or a later replay of the same date is), so the date's sums
            # after the fences are never wiped by the replace.
            """CREATE TABLE replay_runs (
                replay_id TEXT PRIMARY KEY,
                usage_date TEXT NOT NULL,
                status TEXT NOT NULL CHECK (status IN ('fencing', 'complete', 'failed')),
                started_at TEXT NOT NULL,
                finished_at TEXT,
                error TEXT
            )""",
        ],
    ),
    (
        6,
        [
            # The single-file design's per-event ledger: since the scale-out redesign
            # (issue 9) request ids are deduplicated in memory per home partition and
            # rebuilt from the topics, and sums reach daily_pending through the batch
            # log, so nothing reads or writes these any more. A database billed by that
            # design loses only its old request ids, which the workers read back from
            # the usage topic (agents/summary_writer/writer.py, carry_over_offsets).
            # source_offsets stays (module docstring).
            "DROP VIEW ledger_events",
            "DROP TABLE ledger",
            "DROP TABLE ledger_buckets",
        ],
    ),
    (
        7,
        [
            # Log identity (issue 19): a stored position is tied to the log it was read in.
            # log_mark is the record_mark (streams/kafka/batch_log.py) of the batch-log record at
            # next_offset - 1; usage_mark / rerouted_mark those of the usage and rerouted
            # records at the chain head's positions - 1. A new broker, a recreated or
            # truncated topic holds other records there (or none), and is never mistaken
            # for the log the summary DB followed (agents/summary_writer/log_guard.py).
            # '' = not known yet (a database from before this migration: recorded at the
            # next apply).
            "ALTER TABLE batch_log_heads ADD COLUMN log_mark TEXT NOT NULL DEFAULT ''",
            "ALTER TABLE batch_log_heads ADD COLUMN usage_mark TEXT NOT NULL DEFAULT ''",
            "ALTER TABLE batch_log_heads ADD COLUMN rerouted_mark TEXT NOT NULL DEFAULT ''",
        ],
    ),
    (
        8,
        [
            # Batch-log records fit Apache Kafka's 1 MiB default (streams/kafka/batch_log.py): a
            # batch too large for one record comes as BatchPart records and then the
            # entry naming them. A part's rows wait here (JSON text) until that entry is
            # read, maybe in a later transaction; a valid link drops the parts before it.
            """CREATE TABLE batch_log_parts (
                partition INTEGER NOT NULL,
                offset INTEGER NOT NULL,
                rows BLOB NOT NULL,
                PRIMARY KEY (partition, offset)
            ) WITHOUT ROWID""",
        ],
    ),
    (
        9,
        [
            # Who this summary DB is (streams/kafka/writer_claim.py): a restart, or a backup of
            # it restored, is the same writer and takes its claim back at once; another
            # DB on the same batch log is a second writer and is refused.
            """CREATE TABLE summary_db (
                id TEXT NOT NULL PRIMARY KEY,
                created_at TEXT NOT NULL
            )""",
            "INSERT INTO summary_db VALUES (lower(hex(randomblob(16))),"
            " strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
        ],
    ),
]


# The billing features' migrations (versions 20 and up) come after the core ones.
MIGRATIONS.extend(BILLING_MIGRATIONS)


def json_for_sqlite(payload: bytes) -> str | None:
    """JSON text for SQLite's JSON functions (``json_each``, ``->>``), or None when they
    would cut it short: an escaped NUL (``\\u0000``) ends their strings. Callers bind
    such rows as values instead (one rule for every one-statement insert)."""
    return None if b"\\u0000" in payload else payload.decode()


def utc_now_text() -> str:
    """RFC 3339 UTC with microseconds, the format of every ``*_at`` column."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass
class _Writer:
    lock: asyncio.Lock
    owner: asyncio.Task[object] | None = None


_writers: WeakKeyDictionary[aiosqlite.Connection, _Writer] = WeakKeyDictionary()


@asynccontextmanager
async def write_transaction(
    conn: aiosqlite.Connection, *, rollback: bool = False
) -> AsyncIterator[None]:
    """One ``BEGIN IMMEDIATE`` … ``COMMIT`` on ``conn``, ``ROLLBACK`` on error (or always,
    with ``rollback=True``: a dry run).

    Transactions on one connection are serialised by an asyncio lock: the worker shares a
    connection between agents and timers, and two interleaved ``BEGIN``/``ROLLBACK`` pairs
    would otherwise undo each other's work. Re-entrant within a task: a nested call joins
    the transaction its task already holds. Across connections and processes, SQLite's
    write lock serialises them (busy timeout).
    """
    writer = _writers.get(conn)
    if writer is None:
        writer = _writers[conn] = _Writer(asyncio.Lock())
    task = asyncio.current_task()
    if writer.owner is not None and writer.owner is task:
        yield
        return
    async with writer.lock:
        writer.owner = task
        try:
            await conn.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                await conn.execute("ROLLBACK")
                raise
            await conn.execute("ROLLBACK" if rollback else "COMMIT")
        finally:
            writer.owner = None


async def connect(path: Path) -> aiosqlite.Connection:
    """Open the summary DB in WAL mode (readers never block the writer) and migrate it.

    The connection is in autocommit mode: writers open ``BEGIN IMMEDIATE`` themselves so
    that concurrent workers serialise on the write lock instead of failing on upgrade.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = await aiosqlite.connect(path, isolation_level=None, timeout=60)
    try:
        await conn.execute("PRAGMA busy_timeout = 60000")
        await conn.execute("PRAGMA journal_mode = WAL")
        await conn.execute("PRAGMA synchronous = NORMAL")
        await migrate(conn)
    except BaseException:
        await conn.close()
        raise
    return conn


def open_sync(path: Path, cache_mib: int = 2) -> sqlite3.Connection:
    """A plain ``sqlite3`` connection to an already migrated summary DB, for code that runs
    whole transactions in one thread (the summary writer). Autocommit mode, WAL, busy timeout,
    like :func:`connect`; ``check_same_thread`` is off because the owner is an executor
    thread, not the thread that opened it."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=60, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 60000")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    # A batch's summary keys are spread all over daily_pending's B-tree: with SQLite's
    # default 2 MiB page cache most of its updates would read a page from the OS again.
    conn.execute(f"PRAGMA cache_size = -{cache_mib * 1024}")
    # Checkpoint the WAL every ~64 MiB instead of every 4 MiB: a batch dirties pages all
    # over daily_pending, and each checkpoint copies (and fsyncs) them into the database.
    conn.execute("PRAGMA wal_autocheckpoint = 16384")
    # and give the space back: without a limit the WAL file keeps its largest size ever
    conn.execute("PRAGMA journal_size_limit = 67108864")
    # TEMP tables (the summary-key probe) in memory: the default temp store is a file
    conn.execute("PRAGMA temp_store = MEMORY")
    return conn


async def migrate(conn: aiosqlite.Connection) -> None:
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations"
        " (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
    )
    for version, statements in MIGRATIONS:
        await conn.execute("BEGIN IMMEDIATE")
        try:
            cursor = await conn.execute(
                "SELECT 1 FROM schema_migrations WHERE version = ?", (version,)
            )
            if await cursor.fetchone() is None:
                for statement in statements:
                    await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO schema_migrations VALUES (?, ?)", (version, utc_now_text())
                )
            await conn.execute("COMMIT")
        except (sqlite3.Error, BaseException):
            await conn.execute("ROLLBACK")
            raise
