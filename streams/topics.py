"""Every topic the app uses; names come from the settings.

- ``usage_topic``: producers' events (raw bytes; validated by the ingest agent).
- ``dlq_topic``: invalid messages, original bytes plus ``error``/``source-offset`` headers.
The hot path (agents/pipeline.py) reads the usage topic with its own batched consumer;
these declarations give Faust's CLI and web pages the names.
"""

from __future__ import annotations

from streams.app import app, settings

__all__ = ["dlq_topic", "usage_topic"]

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
