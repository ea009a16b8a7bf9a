"""``usage-stream raw-resend``: send the raw points InfluxDB refused back to it.

Why a command: a permanent rejection (missing database, bad token) is not retried
forever; the worker sets the segment aside in ``DATA_DIR/spool/rejected/`` and keeps
billing (:mod:`streams.sinks.shipper`). Once the operator fixed the target, this sends
every set-aside segment to the configured InfluxDB, removing each one InfluxDB took.
Re-sending is idempotent (a point lands on the same series and timestamp), so running
it twice, or after a partial success, writes nothing twice.

Importing this module (agents/wiring.py does, in every worker) also registers the spool
metrics, so ``usage_stream_raw_rejected_segments`` and friends are exported from the start.
"""

from __future__ import annotations

from faust.cli import option

from streams.app import settings
from streams.cli import fail
from streams.sinks.shipper import resend_rejected

__all__ = ["OPTIONS", "raw_resend"]


#: ``raw_resend``'s options in Faust's CLI
OPTIONS = (
    option(
        "--dry-run", is_flag=True, default=False, help="list what would be resent, send nothing"
    ),
)


async def raw_resend(self: object, dry_run: bool) -> None:
    """Re-send the raw points InfluxDB rejected.

    Once the target is fixed: sends every segment set aside in DATA_DIR/spool/rejected/
    to the configured InfluxDB and removes each one it took; running it twice writes
    nothing twice.

    \b
    Example:
      usage-stream raw-resend --dry-run
      usage-stream raw-resend
    """
    from streams.sinks import build_writer, spool_dir
    from streams.sinks.spool import rejected_segments

    directory = spool_dir(settings)
    if not rejected_segments(directory):
        print(f"raw-resend: nothing to resend in {directory / 'rejected'}")
        return
    if not settings.INFLUXDB_URL and not dry_run:
        fail(f"raw-resend needs INFLUXDB_URL (segments stay in {directory / 'rejected'})")
    writer = build_writer(settings)
    try:
        summary = await resend_rejected(
            directory,
            writer,
            batch_size=settings.RAW_BATCH_SIZE,
            dry_run=dry_run,
        )
    except (RuntimeError, OSError) as error:
        fail(f"raw-resend: {error}")
    finally:
        await writer.close()
    total = summary.resent + summary.failed
    if dry_run:
        print(
            f"raw-resend: {summary.resent} segments ({summary.points} points) "
            f"would be resent (dry run)"
        )
    else:
        print(
            f"raw-resend: {summary.resent} of {total} segments resent "
            f"({summary.points} points), {summary.failed} failed"
        )
    if summary.failed:
        fail(f"{summary.failed} segments still rejected; they stay in {directory / 'rejected'}")
