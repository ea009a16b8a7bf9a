"""agents/hot_path/prepare.py: stages 1-4 on hand-built records, without a broker."""

from __future__ import annotations

import subprocess
import sys

from agents.hot_path.batch import PreparedBatch, Reroute
from agents.hot_path.home_partition import ReplayFence
from agents.hot_path.prepare import route, validate
from streams.kafka.batch_log import record_mark
from streams.model.event import CONFLICT, UsageEvent, parse_records
from streams.model.partitioning import home_partitions
from tables.dedupe.seen_requests import Keys
from tests.unit.agents.hot_path.fakes import (
    DAY,
    NOW_MS,
    PARTITIONS,
    TOPICS,
    Homes,
    event,
    homed_at,
    preparer,
    record,
)

KEY = (DAY, "org-1", "user-1", "openai/gpt-4o-mini")


def test_a_valid_event_at_home_is_summed_exactly_and_gets_a_raw_point() -> None:
    (rid,) = homed_at(2)
    records = [record(event(rid), partition=2, offset=7)]
    batch = preparer(Homes.owning(2)).prepare(records)
    home = batch.homes[2]
    # input, output, requests, estimated, cost (nano-USD: 0.0002187 USD)
    assert home.sums == {KEY: [1250, 180, 1, 0, 218_700]}
    (raw,) = batch.lines
    assert raw.startswith("usage_tracking,client_org_id=org-1,")
    assert "cost_usd=0.000218700,markup_cost_usd=0.000284310" in raw  # markup 1.3
    assert f'request_id="{rid}"' in raw
    assert home.new is not None and len(home.new) == 1
    assert (home.usage_next, home.usage_mark) == (8, record_mark(records[0]))
    assert home.rerouted_next == -1  # nothing read there
    assert batch.records == 1 and batch.known == 0 and not batch.invalid
    assert not batch.dead_letters and not batch.reroutes


def test_sums_add_up_exactly_per_key_and_estimate_without_a_price() -> None:
    ids = homed_at(1, 4)
    records = [
        record(event(ids[0], input_tokens=1, output_tokens=2, cost_usd=0.1), 1, 0),
        record(event(ids[1], input_tokens=10, output_tokens=20, cost_usd=0.2), 1, 1),
        record(event(ids[2], input_tokens=100, output_tokens=200, cost_usd=...), 1, 2),
        record(event(ids[3], user_id="user-2", input_tokens=5, output_tokens=6), 1, 3),
    ]
    batch = preparer(Homes.owning(1)).prepare(records)
    assert batch.homes[1].sums == {
        # 0.1 + 0.2 USD exactly (no float sum), the third estimated at 0 (no price known)
        KEY: [111, 222, 3, 1, 300_000_000],
        (DAY, "org-1", "user-2", "openai/gpt-4o-mini"): [5, 6, 1, 0, 218_700],
    }
    assert len(batch.lines) == 4


def test_an_invalid_record_is_a_dead_letter_with_its_reason_and_still_read() -> None:
    (rid,) = homed_at(0)
    records = [
        record(b"{not json", 0, 3),
        record(event(rid, input_tokens=-1), 0, 4),
        record(event(rid), 0, 5),
    ]
    batch = preparer(Homes.owning(0)).prepare(records)
    assert batch.invalid == {"not_json": 1, "bad_value": 1}
    assert [(r.offset, v.reason) for r, v in batch.dead_letters] == [
        (3, "not_json"),
        (4, "bad_value"),
    ]
    assert batch.homes[0].sums[KEY][2] == 1  # only the valid one counts
    assert batch.homes[0].usage_next == 6  # the positions cover the invalid ones too


def test_a_copy_read_away_from_home_is_rerouted_not_counted() -> None:
    (rid,) = homed_at(3)
    records = [record(event(rid), partition=0, offset=11)]
    batch = preparer(Homes.owning(0, 3)).prepare(records)
    assert batch.reroutes == [Reroute(records[0], rid, 3)]
    assert 3 not in batch.homes  # counted when read from the rerouted topic, at home
    assert batch.homes[0].sums == {}
    assert batch.homes[0].usage_next == 12  # partition 0 read up to here all the same
    assert batch.records == 1


def test_a_rerouted_record_is_at_home_whatever_its_id() -> None:
    (rid,) = homed_at(3)
    records = [record(event(rid), partition=1, offset=0, topic=TOPICS.rerouted)]
    batch = preparer(Homes.owning(1)).prepare(records)
    assert not batch.reroutes
    assert batch.homes[1].sums[KEY][2] == 1
    assert batch.homes[1].rerouted_next == 1 and batch.homes[1].usage_next == -1
    assert batch.records == 0  # copies are counted where they were first read


def test_a_copy_inside_the_batch_is_a_duplicate() -> None:
    (rid,) = homed_at(2)
    records = [record(event(rid), 2, 0), record(event(rid), 2, 1)]
    batch = preparer(Homes.owning(2)).prepare(records)
    assert batch.known == 1
    assert batch.homes[2].sums[KEY][2] == 1
    assert len(batch.lines) == 1


def test_a_copy_of_an_id_seen_before_is_a_duplicate() -> None:
    (rid,) = homed_at(2)
    homes = Homes.owning(2)
    first = preparer(homes).prepare([record(event(rid), 2, 0)])
    new = first.homes[2].new
    assert new is not None
    homes.states[2].seen.add_keys(new, NOW_MS)  # as the append does
    batch = preparer(homes).prepare([record(event(rid), 2, 1)])
    assert batch.known == 1 and batch.homes[2].sums == {} and not batch.lines


def test_a_copy_with_other_billing_fields_is_a_conflicting_duplicate() -> None:
    (rid,) = homed_at(2)
    records = [record(event(rid, input_tokens=9), 2, 5), record(event(rid), 2, 4)]
    batch = preparer(Homes.owning(2)).prepare(records)
    assert batch.invalid == {CONFLICT: 1}
    ((dead, verdict),) = batch.dead_letters
    assert dead.offset == 5 and verdict.reason == CONFLICT  # the lower offset counts
    assert "input_tokens" in verdict.message
    assert batch.homes[2].sums[KEY][:3] == [1250, 180, 1]
    assert batch.known == 0


def test_the_batch_being_committed_counts_as_seen_unless_voided() -> None:
    (rid,) = homed_at(2)
    homes = Homes.owning(2)
    in_flight = preparer(homes).prepare([record(event(rid), 2, 0)])
    again = preparer(homes).prepare([record(event(rid), 2, 1)], in_flight)
    assert again.known == 1 and again.homes[2].sums == {}
    homes.epochs[2] += 1  # a catch-up voided the batch in flight: it is never appended
    voided = preparer(homes).prepare([record(event(rid), 2, 1)], in_flight)
    assert voided.known == 0 and voided.homes[2].sums[KEY][2] == 1


def test_a_partition_not_owned_is_left_out() -> None:
    (rid,) = homed_at(2)
    batch = preparer(Homes.owning(1)).prepare([record(event(rid), 2, 0)])
    assert batch.homes == {} and not batch.lines
    assert batch.offsets == {(TOPICS.usage, 2): 1}  # read, but nothing claims it


def test_a_partition_revoked_while_prepared_is_left_out() -> None:
    ids = homed_at(2) + homed_at(1)
    homes = Homes.owning(1, 2)
    records = [record(event(ids[0]), 2, 0), record(event(ids[1]), 1, 0)]
    stages = preparer(homes).stages(records)
    batch = next(stages)
    next(stages)  # validated and routed; the loop runs, a rebalance comes
    homes.owned.discard(2)
    homes.epochs[2] += 1
    for _ in stages:
        pass
    assert set(batch.homes) == {1}
    assert batch.homes[1].sums[KEY][2] == 1 and len(batch.lines) == 1


def test_a_partition_rebuilt_while_prepared_is_left_out_even_if_owned_again() -> None:
    (rid,) = homed_at(2)
    homes = Homes.owning(2)
    stages = preparer(homes).stages([record(event(rid), 2, 0)])
    batch = next(stages)
    next(stages)
    next(stages)  # deduplicated; the state is rebuilt (a new epoch) before aggregation
    homes.own(2)
    for _ in stages:
        pass
    assert batch.epochs == {2: 1} and homes.epochs[2] == 2
    assert not batch.lines
    home = batch.homes[2]
    assert home.sums == {} and home.usage_next == -1  # its part is never appended


def test_events_a_replay_counted_below_its_fence_are_not_summed() -> None:
    ids = homed_at(2, 2)
    homes = Homes.owning(2)
    homes.states[2].fences[DAY] = ReplayFence(DAY, usage_end=1, rerouted_end=0)
    records = [record(event(ids[0]), 2, 0), record(event(ids[1]), 2, 1)]
    batch = preparer(homes).prepare(records)
    assert batch.homes[2].sums[KEY][2] == 1  # offset 1 only: the replay counted offset 0
    assert len(batch.lines) == 2  # both raw points are written (the same points again)
    new = batch.homes[2].new
    assert new is not None and len(new) == 2  # and both ids are seen


def test_validate_and_route_one_by_one() -> None:
    (home_2,) = homed_at(2)
    (home_0,) = homed_at(0)
    records = [record(event(home_2), 2, 0), record(b"[]", 2, 1), record(event(home_0), 2, 2)]
    batch = PreparedBatch(len(records))
    valid = validate(batch, records, parse_records(records))
    assert [r.offset for r, _ in valid] == [0, 2]
    assert all(isinstance(e, UsageEvent) for _, e in valid)
    assert batch.offsets == {(TOPICS.usage, 2): 3} and batch.last[(TOPICS.usage, 2)].offset == 2
    by_home = route(batch, valid, TOPICS.rerouted, PARTITIONS)
    assert {p: [r.offset for r, _ in pairs] for p, pairs in by_home.items()} == {2: [0]}
    assert [(r.record.offset, r.home) for r in batch.reroutes] == [(2, 0)]
    assert home_partitions([home_0], PARTITIONS) == [0]


def test_keys_of_new_requests_are_a_sorted_run() -> None:
    ids = homed_at(3, 50)
    records = [record(event(rid), 3, i) for i, rid in enumerate(ids)]
    batch = preparer(Homes.owning(3)).prepare(records)
    new = batch.homes[3].new
    assert new is not None and len(new) == 50
    expected = Keys.of(ids).sorted()
    assert new.a.tolist() == expected.a.tolist() and new.b.tolist() == expected.b.tolist()


def test_the_stages_import_without_the_app() -> None:
    code = (
        "import sys\n"
        "import agents.hot_path.prepare, agents.hot_path.batch_reader\n"
        "import agents.hot_path.committer, agents.hot_path.ownership\n"
        "assert 'streams.app' not in sys.modules, 'the Faust app was imported'\n"
        "assert 'agents.hot_path.service' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
