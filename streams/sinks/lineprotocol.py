"""Raw points as InfluxDB line protocol (docs/contract.md §2), built with plain f-strings.

``influxdb_client.Point.to_line_protocol`` is about 9x slower; this is the hot path.

One line per point::

    usage_tracking,client_org_id=<t>,model=<t>,user_id=<t> input_tokens=<n>i,
        output_tokens=<n>i,total_tokens=<n>i,cost_usd=<d>,markup_cost_usd=<d>,
        request_id="<s>" <ns>

Escaping (tag values): ``\\`` -> ``\\\\``, ``,`` -> ``\\,``, space -> ``\\ ``, ``=`` -> ``\\=``.
A newline or carriage return cannot appear in line protocol at all, so it is written
in a visible escaped form: the two characters ``\\n`` / ``\\r`` (so a real newline and
the literal text ``\\n`` read back alike: lossy, but only for such absurd ids).
InfluxDB 1.x/2.x OSS do not unescape ``\\\\`` in tags and keep backslashes doubled
(InfluxDB 3, Cloud and VictoriaMetrics unescape them); those servers also cannot parse
a tag value ending in a backslash, so such a value gets an escaped space appended
(``x\\`` -> ``x\\\\\\ ``) and every line stays parseable everywhere. An empty tag value
is invalid line protocol: the tag is omitted (InfluxQL reads it back as ``""``).

String field ``request_id``: ``\\`` and ``"`` are backslash-escaped, newline/CR as above.
Money fields are floats written from the exact nano integer as decimal text
(``218700`` nano -> ``0.000218700``), never through float arithmetic. Integer fields
and nano amounts are clamped to 2**63 - 1 (InfluxDB's int64) so no line is ever rejected.

Strings a sink cannot store as they are (issue 10, measured on influxd 1.6.7): influxd
accepts NUL, every other control character, quotes, ``#``, DEL and any Unicode in tag
values and string fields as they are (they read back unchanged), so those are written
verbatim; only ``\n``/``\r`` (which end a line) are written in the visible escaped form
above. A valid event therefore always gives a line every server accepts: never a
rejected batch retried forever, never a dropped point. The validator guarantees the rest
(valid UTF-8, no lone surrogates, bounded lengths and integers).

Times outside InfluxDB's range (1677-09-21 .. 2262-04-11 in ns; an RFC 3339 timestamp of
year 1 is a valid event) would make the server reject the whole batch, so the
millisecond part is clamped to the nearest representable one (the sub-millisecond
digits still tell requests apart). The bill uses the true event time; only the raw
point of such an absurd timestamp sits at the range's edge.

Timestamp (ns): ``event_ms * 1_000_000 + sub_ms(request_id)``, ``sub_ms`` being a
blake2b hash of the request_id mod 10**6. A redelivered duplicate lands on the very same
point (same series, same time: InfluxDB overwrites it with identical fields), while two
distinct requests in the same series and millisecond collide with probability 1e-6 per
pair, about k*(k-1)/2 * 1e-6 for k such requests (then the later one overwrites the
earlier raw point; the billing summaries in SQLite do not depend on raw points).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "MEASUREMENT",
    "RawPoint",
    "format_nano",
    "line",
    "sub_ms",
    "timestamp_ns",
    "to_line",
    "to_lines",
]

MEASUREMENT = "usage_tracking"
_NANO = 1_000_000_000
#: InfluxDB integers are int64; a larger value would make the server reject the whole
#: line forever (a poison batch), so integers and nano amounts are clamped to it.
_MAX = 2**63 - 1
#: Milliseconds kept inside InfluxDB's time range (-2**63 + 2 .. 2**63 - 2 ns) with room
#: for the sub-millisecond digits (0 .. 999_999 ns).
_MIN_MS = -(2**63 - 2) // 1_000_000 + 1
_MAX_MS = (2**63 - 2) // 1_000_000 - 1

_TAG_ESCAPES = str.maketrans(
    {"\\": "\\\\", ",": "\\,", " ": "\\ ", "=": "\\=", "\n": "\\n", "\r": "\\r"}
)
_STRING_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r"})
_TAG_SPECIALS = frozenset("\\, =\n\r")
_STRING_SPECIALS = frozenset('\\"\n\r')


@dataclass(frozen=True, slots=True)
class RawPoint:
    """One usage event as a raw point; money in exact integer nano-USD."""

    request_id: str
    client_org_id: str
    user_id: str
    model: str
    input_tokens: int
    output_tokens: int
    cost_nano: int
    markup_cost_nano: int
    event_ms: int


@functools.lru_cache(maxsize=65_536)
def _tag(key: str, value: str) -> str:
    """``,key=escaped`` (cached: org, user and model values repeat a lot)."""
    if not value:
        return ""
    if not _TAG_SPECIALS.isdisjoint(value):
        escaped = value.translate(_TAG_ESCAPES)
        if value.endswith("\\"):
            escaped += "\\ "
        value = escaped
    return f",{key}={value}"


def _string(value: str) -> str:
    if _STRING_SPECIALS.isdisjoint(value):
        return value
    return value.translate(_STRING_ESCAPES)


def format_nano(nano: int) -> str:
    """Exact decimal text of ``nano`` * 1e-9, always with 9 decimals (``0.000218700``)."""
    if nano < 0:
        return "-" + format_nano(-nano)
    return f"{nano // _NANO}.{nano % _NANO:09d}"


def sub_ms(request_id: str) -> int:
    """Deterministic sub-millisecond offset in ns (0..999_999) derived from the request_id."""
    digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 1_000_000


def timestamp_ns(point: RawPoint) -> int:
    return _ns(point.event_ms, point.request_id)


def _ns(event_ms: int, request_id: str) -> int:
    """The point's time: the event's millisecond (clamped to InfluxDB's range) + sub_ms."""
    if not _MIN_MS <= event_ms <= _MAX_MS:
        event_ms = min(max(event_ms, _MIN_MS), _MAX_MS)
    return event_ms * 1_000_000 + sub_ms(request_id)


def to_line(p: RawPoint) -> str:
    """The line protocol line (no trailing newline) of one point."""
    return line(
        p.request_id,
        p.client_org_id,
        p.user_id,
        p.model,
        p.input_tokens,
        p.output_tokens,
        p.cost_nano,
        p.markup_cost_nano,
        p.event_ms,
    )


# One cache per tag, with the value as its only argument: lru_cache then keys on the
# string itself (no tuple per call). Why not a cache of whole series, as before: on the
# many-keys workload (~290k (client, user, model) keys, ~3.5 events each) it missed
# most of the time and rebuilt the series from three more cached calls; the users alone
# are a fifth as many and their escaped tags stay cached.
@functools.lru_cache(maxsize=65_536)
def _org_tag(value: str) -> str:
    return _tag("client_org_id", value)


@functools.lru_cache(maxsize=65_536)
def _model_tag(value: str) -> str:
    return _tag("model", value)


@functools.lru_cache(maxsize=1 << 18)
def _user_tag(value: str) -> str:
    return _tag("user_id", value)


def _series(client_org_id: str, user_id: str, model: str) -> str:
    """Measurement and tags of a series, tags sorted by key."""
    return MEASUREMENT + _org_tag(client_org_id) + _model_tag(model) + _user_tag(user_id)


_blake2b = hashlib.blake2b
_from_bytes = int.from_bytes


def line(
    request_id: str,
    client_org_id: str,
    user_id: str,
    model: str,
    input_tokens: int,
    output_tokens: int,
    cost_nano: int,
    markup_cost_nano: int,
    event_ms: int,
) -> str:
    """:func:`to_line` from plain values: the hot path builds no :class:`RawPoint`.

    The series and the time are :func:`_series` and :func:`_ns` written out inline (the
    same bytes, one Python call per part fewer): this runs once per new event and was
    ~8 % of the worker's main thread (docs/performance.md)."""
    inp = input_tokens if input_tokens < _MAX else _MAX
    out = output_tokens if output_tokens < _MAX else _MAX
    cost = cost_nano if cost_nano < _MAX else _MAX
    markup = markup_cost_nano if markup_cost_nano < _MAX else _MAX
    total = inp + out
    rid = request_id if _STRING_SPECIALS.isdisjoint(request_id) else _string(request_id)
    if not _MIN_MS <= event_ms <= _MAX_MS:
        event_ms = min(max(event_ms, _MIN_MS), _MAX_MS)
    offset = _from_bytes(_blake2b(request_id.encode(), digest_size=8).digest(), "big") % 1_000_000
    return (
        f"{MEASUREMENT}{_org_tag(client_org_id)}{_model_tag(model)}{_user_tag(user_id)}"
        f" input_tokens={inp}i,output_tokens={out}i,"
        f"total_tokens={total if total < _MAX else _MAX}i,"
        f"cost_usd={cost // _NANO}.{cost % _NANO:09d},"
        f"markup_cost_usd={markup // _NANO}.{markup % _NANO:09d},"
        f'request_id="{rid}" {event_ms * 1_000_000 + offset}'
    )


def to_lines(points: Iterable[RawPoint]) -> list[str]:
    return [to_line(p) for p in points]
