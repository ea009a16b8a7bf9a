"""Every topic the app uses; names come from the settings.

- ``usage_topic``: producers' events (raw bytes; validated by the ingest agent).
- ``dlq_topic``: invalid messages, original bytes plus ``error``/``source-offset`` headers.
- ``by_request_topic``: valid events re-keyed by ``request_id`` (internal). Producers may
  key by anything, so duplicates can sit on different source partitions; after this hop
  every copy of a request lands on one partition, next to its dedupe-table entry.
"""

from __future__ import annotations

from streams.app import app, settings

__all__ = ["by_request_topic", "dlq_topic", "usage_topic"]

usage_topic = app.topic(
    settings.USAGE_TOPIC,
    key_type=bytes,
    value_type=bytes,
    key_serializer="raw",
    value_serializer="raw",
    allow_empty=True,
)

dlq_topic = app.topic(
    settings.dlq_topic,
    key_type=bytes,
    value_type=bytes,
    key_serializer="raw",
    value_serializer="raw",
)

by_request_topic = app.topic(
    f"{settings.APP_ID}-{settings.USAGE_TOPIC}-by-request",
    key_type=bytes,
    value_type=bytes,
    key_serializer="raw",
    value_serializer="raw",
    partitions=settings.USAGE_TOPIC_PARTITIONS,
    internal=True,
)
