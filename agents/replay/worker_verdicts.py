"""The copies the live workers judged ``conflicting_duplicate``, so that a replay bills the
copy they billed.

Why the replay asks: which copy of a request counts is the one the chain consumed first
(:mod:`agents.hot_path.dedupe`): batch by batch, the usage topic and the rerouted topic
interleaved as the batches took them. A replay reads a partition's usage slice, then its
rerouted slice, and keeps the first copy it reads; it does not know the batches. For
copies with the same billing fingerprint that is the same bill; for copies that conflict
it is not when the rerouted copy was consumed in an earlier batch: the replay would bill
the usage copy the worker dead-lettered. The verdict is recorded where the worker sends
every conflict: the dead-letter topic, with the copy's ``source-offset``
(``topic/partition/offset``). So the replay reads the dead-letter topic over the same time
range as the usage topic and leaves those copies out; each remaining copy of a request
then has the billed fingerprint, and whichever it reads first bills the same.

A verdict names its copy by position and by the copy's bytes (the dead letter's value is
the original value): a position alone would, after the usage or rerouted topic was
recreated (offsets start again at 0) under a dead-letter topic that kept its records,
name another record, and a valid event there would be left out.

What this does not cover: a conflict the workers had not judged yet when the replay read
the dead-letter topic (copies at the live edge) is judged by the replay's own order; a
dead-letter topic whose retention already deleted the date's verdicts (keep it at least
as long as the usage topic) likewise.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Mapping
from datetime import date
from typing import Protocol, TypeVar

from agents.replay.topic_slice import ReplayReader, TopicNotFound, topic_partitions
from streams.model.event import CONFLICT
from streams.settings import Settings

__all__ = ["ConflictLosers", "conflict_losers", "parse_source", "value_digest", "without_losers"]

#: home partition -> topic -> ``[offset, value digest]`` of each copy the workers
#: dead-lettered as a conflict (lists: they cross to the reader processes as JSON)
ConflictLosers = dict[int, dict[str, list[tuple[int, str]]]]

_ERROR_PREFIX = f"{CONFLICT}:".encode()


def value_digest(value: bytes | None) -> str:
    """What names a copy's bytes in a verdict (module docstring)."""
    return hashlib.blake2b(value or b"", digest_size=8).hexdigest()


class _Record(Protocol):
    offset: int
    value: bytes | None


_R = TypeVar("_R", bound=_Record)


def without_losers(records: list[_R], losers: Mapping[int, str]) -> list[_R]:
    """``records`` of one partition but the copies judged conflicts (``losers``: offset
    -> value digest): the very copy, by its position and its bytes (module docstring)."""
    return [
        record
        for record in records
        if (digest := losers.get(record.offset)) is None or digest != value_digest(record.value)
    ]


def parse_source(value: bytes) -> tuple[str, int, int] | None:
    """A ``source-offset`` header (``topic/partition/offset``), or None when malformed
    (topic names cannot hold ``/``)."""
    try:
        topic, partition, offset = value.decode().rsplit("/", 2)
        return topic, int(partition), int(offset)
    except (UnicodeDecodeError, ValueError):
        return None


async def conflict_losers(
    settings: Settings, day: date, from_offsets: Mapping[int, int] | None = None
) -> ConflictLosers:
    """Every copy of the usage or rerouted topic that a worker dead-lettered as
    ``conflicting_duplicate`` where the replay of ``day`` may read it (module docstring).

    The dead-letter topic is read from the replay's start time (a verdict is written after
    the copy it judges arrived), or whole when ``--from-offsets`` moved the usage slice's
    starts, up to its end as of now. No dead-letter topic: no verdicts."""
    wanted = {settings.USAGE_TOPIC, settings.rerouted_topic}
    losers: ConflictLosers = defaultdict(lambda: defaultdict(list))
    try:
        whole = None
        if from_offsets:
            whole = {p: 0 for p in await topic_partitions(settings, settings.dlq_topic)}
        async with ReplayReader(settings, day, whole, topic=settings.dlq_topic) as reader:
            async for batch in reader.batches():
                for _, records in batch:
                    for record in records:
                        headers = dict(record.headers or ())
                        if not headers.get("error", b"").startswith(_ERROR_PREFIX):
                            continue
                        source = parse_source(headers.get("source-offset", b""))
                        if source is not None and source[0] in wanted:
                            topic, partition, offset = source
                            losers[partition][topic].append((offset, value_digest(record.value)))
    except TopicNotFound:
        return {}
    return {p: dict(topics) for p, topics in losers.items()}
