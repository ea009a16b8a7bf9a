"""What one benchmark run produces: per-run measurements and count checks, as plain
dataclasses so the report, the JSON file and the smoke test all read the same fields."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Check:
    """One count a correct pipeline must reproduce exactly (never a speed)."""

    run: str
    name: str
    expected: int
    actual: int | None

    @property
    def ok(self) -> bool:
        return self.actual == self.expected

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "ok": self.ok}


@dataclass
class RunResult:
    """One measured run: a floor (raw reader, Faust no-op), a worker or the replay."""

    name: str
    label: str
    kind: str  # "floor" | "worker" | "replay"
    records: int = 0
    seconds: float | None = None  # the measured span (see each run for what it covers)
    events_per_s: float | None = None
    peak_rss_mb: float | None = None
    #: [seconds since the start of the measured span, records processed, RSS MB or None]
    samples: list[list[float | None]] = field(default_factory=list)
    skipped: str | None = None
    error: str | None = None
    details: dict[str, object] = field(default_factory=dict)

    def finish(self, seconds: float, records: int) -> None:
        self.seconds = seconds
        self.records = records
        self.events_per_s = records / seconds if seconds > 0 else None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)
