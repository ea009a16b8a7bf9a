"""The hot path's partition assignor: whole home partitions, sticky, balanced.

A home partition p is partition p of the usage topic *and* of the rerouted topic: one
worker must own both (its dedupe state is p's). Kafka's range assignor does that for
co-partitioned topics, but it lays partitions out by member id, and member ids are new
at every join: a worker joining or leaving reshuffled nearly every partition, and every
moved partition costs its new owner a rebuild of the seen request ids.

This assignor keeps each home partition with the member that owned it (each member
sends the home partitions it owns in its join metadata), moves only what balance
requires (no member above ``ceil(N / members)`` nor below ``floor``), and gives the
free ones to the members with the fewest. So a joining worker takes only its share
from the others, a leaving worker's partitions spread over the rest, and a restart
gets its own partitions back.

aiokafka calls assignors through classmethods, so each consumer gets its own subclass
(:func:`sticky_home_assignor`) bound to the callable that tells what it owns now.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterable, Mapping

import msgspec
from aiokafka.cluster import ClusterMetadata
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.protocol import (
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)

__all__ = ["assign_home_partitions", "sticky_home_assignor"]

log = logging.getLogger(__name__)

_OWNED = msgspec.json.Decoder(list[int])


def assign_home_partitions(
    partitions: Iterable[int], owned: Mapping[str, Iterable[int]]
) -> dict[str, list[int]]:
    """Home partitions per member: balanced (each gets ``floor`` or ``ceil`` of N / members;
    the members that own most get the ``ceil`` slots), and each keeps as many of the
    partitions it owned as its share allows (a partition claimed by two stays with the
    first in id order); the rest go to the members with room, fewest first."""
    members = sorted(owned)
    if not members:
        return {}
    wanted = set(partitions)
    kept: dict[str, list[int]] = {member: [] for member in members}
    taken: set[int] = set()
    for member in members:
        for partition in sorted(set(owned[member]) & wanted - taken):
            kept[member].append(partition)
            taken.add(partition)
    base, extra = divmod(len(wanted), len(members))
    by_claim = sorted(members, key=lambda m: (-len(kept[m]), m))
    room = {member: base + (1 if rank < extra else 0) for rank, member in enumerate(by_claim)}
    spare = sorted(wanted - taken)
    for member in members:
        spare += kept[member][room[member] :]
        del kept[member][room[member] :]
    for partition in sorted(spare):
        member = min(
            (m for m in members if len(kept[m]) < room[m]), key=lambda m: (len(kept[m]), m)
        )
        kept[member].append(partition)
    return {member: sorted(parts) for member, parts in kept.items()}


def sticky_home_assignor(owned: Callable[[], Iterable[int]]) -> type[AbstractPartitionAssignor]:
    """An assignor class for one consumer; ``owned`` tells its current home partitions."""

    class StickyHomeAssignor(AbstractPartitionAssignor):
        name = "usage-stream-sticky-home"
        version = 0

        @classmethod
        def metadata(cls, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
            user_data = msgspec.json.encode(sorted(owned()))
            return ConsumerProtocolMemberMetadata(cls.version, sorted(topics), user_data)

        @classmethod
        def assign(
            cls,
            cluster: ClusterMetadata,
            members: Mapping[str, ConsumerProtocolMemberMetadata],
        ) -> dict[str, ConsumerProtocolMemberAssignment]:
            topics = sorted({topic for meta in members.values() for topic in meta.subscription})
            counts = {t: len(cluster.partitions_for_topic(t) or ()) for t in topics}
            partitions = range(min(counts.values()) if counts else 0)
            if len(set(counts.values())) > 1:
                log.warning("assignor: topics of unequal partition counts %s", counts)
            previous = {}
            for member, meta in members.items():
                try:
                    previous[member] = _OWNED.decode(meta.user_data or b"[]")
                except msgspec.DecodeError:
                    previous[member] = []
            homes = assign_home_partitions(partitions, previous)
            assignment: dict[str, ConsumerProtocolMemberAssignment] = {}
            for member in members:
                per_topic = collections.defaultdict(list)
                for topic in topics:
                    per_topic[topic] = list(homes.get(member, []))
                assignment[member] = ConsumerProtocolMemberAssignment(
                    cls.version, sorted(per_topic.items()), b""
                )
            return assignment

        @classmethod
        def on_assignment(cls, assignment: ConsumerProtocolMemberAssignment) -> None:
            pass

    return StickyHomeAssignor
