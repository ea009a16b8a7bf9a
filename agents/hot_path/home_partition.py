"""A home partition's state on the worker that owns it (:class:`HomePartition`).

The request ids seen (:class:`tables.dedupe.seen_requests.SeenRequests`), the batch
log's chain head (where the usage and rerouted partitions were read up to, and the
partition's event-time watermark: :mod:`streams.kafka.batch_log`), and the replay fences
met on the chain. A plain record of its own, apart from the :class:`~agents.hot_path.
home_state.Rebuilder` that builds it, because the snapshots, the ownership, the prepare
stages and the committer all read it, and the rebuilder uses the snapshots: with the
state beside the rebuilder, the snapshots and the rebuilder imported each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from streams.kafka.batch_log import ChainHead
from tables.dedupe.seen_requests import SeenRequests

__all__ = ["HomePartition", "ReplayFence"]


@dataclass(frozen=True, slots=True)
class ReplayFence:
    """A replay counted the events of ``usage_date`` below these positions itself."""

    usage_date: str
    usage_end: int
    rerouted_end: int


@dataclass(slots=True)
class HomePartition:
    partition: int
    seen: SeenRequests
    head: ChainHead = field(default_factory=ChainHead)
    fences: dict[str, ReplayFence] = field(default_factory=dict)
    #: the batch log's next offset as last seen: where this worker's next append must
    #: land to be sure nothing came between (else it catches up: agents/hot_path/committer.py)
    log_end: int = 0

    def bounds(self) -> tuple[int, int] | None:
        """The highest fence positions (usage, rerouted) this partition has not read past
        in both topics, or None. Below them the replay counted a date; copies below must
        be read before copies above, or a request could count on both sides."""
        open_fences = [
            f
            for f in self.fences.values()
            if self.head.usage_next < f.usage_end or self.head.rerouted_next < f.rerouted_end
        ]
        if not open_fences:
            return None
        return (
            max(f.usage_end for f in open_fences),
            max(f.rerouted_end for f in open_fences),
        )

    def fenced(self, usage_date: str, rerouted: bool, offset: int) -> bool:
        """True when a replay counted this event (its date, below the fence)."""
        fence = self.fences.get(usage_date)
        if fence is None:
            return False
        return offset < (fence.rerouted_end if rerouted else fence.usage_end)
