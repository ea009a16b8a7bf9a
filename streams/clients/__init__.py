"""HTTP clients for reference data (NBP exchange rates, OpenRouter prices).

Plain asyncio + aiohttp: no Faust here, so the CLI and tests can use them directly.
"""

from streams.clients.http import (
    MalformedResponse,
    RequestRejected,
    RetryPolicy,
    SourceError,
    SourceUnavailable,
)

__all__ = [
    "MalformedResponse",
    "RequestRejected",
    "RetryPolicy",
    "SourceError",
    "SourceUnavailable",
]
