"""Budgets and their threshold alerts (docs/contract.md §3, §4, §7), end to end: the real
``usage-stream budget`` command, a real worker on the real broker, and a real HTTP
receiver (an aiohttp server in the test) that gets the webhook POSTs.

Spend is marked-up USD (1.3 × raw here); all events of a client share one
(user, model, date) row, so the expected spend is exact: raw nano × 1.3.
"""

from __future__ import annotations

import time
from datetime import UTC, date, datetime, timedelta

import orjson

from tests.billing.helpers import (
    Receiver,
    event,
    local_today,
    one_line_error,
    publish,
    settled,
)
from tests.ground_truth import Expected, ground_truth
from tests.harness import Stack, wait_for

INTERVAL = 0.5  # the stack's ROLLUP_INTERVAL_SECONDS


def alerts(stack: Stack) -> list[tuple]:
    return stack.query(
        "SELECT client_org_id, usage_month, threshold_pct, spent_nano, limit_nano, delivered"
        " FROM budget_alerts ORDER BY fired_at, client_org_id, threshold_pct"
    )


def spent_live(stack: Stack, client: str, month: str) -> int:
    ((nano,),) = stack.query(
        "SELECT COALESCE(SUM(markup_cost_nano), 0) FROM usage_daily_live"
        " WHERE client_org_id = ? AND substr(usage_date, 1, 7) = ?",
        (client, month),
    )
    return int(nano)


def fired_at(stack: Stack, client: str, month: str, pct: int) -> float:
    ((text,),) = stack.query(
        "SELECT fired_at FROM budget_alerts WHERE client_org_id = ? AND usage_month = ?"
        " AND threshold_pct = ?",
        (client, month, pct),
    )
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def month_of(day: date) -> str:
    return day.strftime("%Y-%m")


def test_alerts_fire_once_per_month_across_restarts_and_a_receiver_outage(stack: Stack) -> None:
    today = local_today()
    month = month_of(today)
    last_month_day = today.replace(day=1) - timedelta(days=1)
    last_month = month_of(last_month_day)
    receiver = Receiver().start()
    try:
        done = stack.cli(
            "budget", "set", "org-a", "--monthly-usd", "1", "--alert-at", "50,100",
            "--webhook", receiver.url,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert receiver.url not in done.stdout.decode()  # a webhook's path may be a token
        worker = stack.worker().start()
        worker.wait_assigned()

        # last month: 0.5 raw = 0.65 marked up, 65 % of 1 USD: its 50 % fires
        publish(stack, [event("a-prev-1", "org-a", last_month_day, "0.5")])
        wait_for(lambda: len(receiver.received) == 1, 60, "last month's 50 % alert")
        assert receiver.bodies[0] == {
            "client_org_id": "org-a",
            "usage_month": last_month,
            "threshold_pct": 50,
            "limit_usd": "1.000000000",
            "spent_usd": "0.650000000",
            "fired_at": receiver.bodies[0]["fired_at"],
        }

        # a new month starts afresh: 0.39 this month is 39 %, whatever last month spent
        publish(stack, [event("a-1", "org-a", today, "0.3")])
        settled(stack, 2)
        time.sleep(4 * INTERVAL)
        assert len(receiver.received) == 1
        assert (
            worker.metrics()["usage_stream_budget_used_ratio{client_org_id=org-a}"]
            == spent_live(stack, "org-a", month) / 1e9
        )

        # ... and its 50 % fires again for this month, within two rollup intervals of the
        # crossing showing in usage_daily_live
        publish(stack, [event("a-2", "org-a", today, "0.1", second=1)])
        wait_for(lambda: spent_live(stack, "org-a", month) == 520_000_000, 60, "52 % live")
        visible = time.time()
        wait_for(lambda: len(receiver.received) == 2, 30, "this month's 50 % alert")
        assert receiver.bodies[1]["usage_month"] == month
        assert receiver.bodies[1]["threshold_pct"] == 50
        assert receiver.bodies[1]["spent_usd"] == "0.520000000"
        assert fired_at(stack, "org-a", month, 50) - visible <= 2 * INTERVAL + 1.0

        # once: more spend below the next threshold fires nothing
        publish(stack, [event("a-3", "org-a", today, "0.05", second=2)])
        settled(stack, 4)
        time.sleep(4 * INTERVAL)
        assert len(receiver.received) == 2

        # a restart does not fire it again
        assert worker.stop() == 0
        worker = stack.worker(WEB_PORT=worker.env["WEB_PORT"]).start()
        worker.wait_assigned()
        wait_for(
            lambda: (
                worker.metrics().get("usage_stream_budget_used_ratio{client_org_id=org-a}") == 0.585
            ),
            30,
            "the restarted writer's budget watch",
        )
        time.sleep(4 * INTERVAL)
        assert len(receiver.received) == 2
        assert worker.metrics()["usage_stream_budget_alerts_total{result=fired}"] == 0

        # a receiver that is down gets the alert once it is back
        receiver.stop()
        publish(stack, [event("a-4", "org-a", today, "0.35", second=3)])
        wait_for(
            lambda: (
                stack.query(
                    "SELECT attempts >= 2 AND last_error IS NOT NULL FROM budget_alerts"
                    " WHERE usage_month = ? AND threshold_pct = 100 AND delivered = 0",
                    (month,),
                )
                == [(1,)]
            ),
            60,
            "the 100 % alert to fail twice",
        )
        metrics = worker.metrics()
        assert metrics["usage_stream_budget_alerts_total{result=failed}"] >= 2
        assert metrics["usage_stream_budget_alerts_undelivered"] == 1
        receiver.start()
        wait_for(lambda: len(receiver.received) == 3, 60, "the alert after the outage")
        assert receiver.bodies[2] | {"fired_at": None} == {
            "client_org_id": "org-a",
            "usage_month": month,
            "threshold_pct": 100,
            "limit_usd": "1.000000000",
            "spent_usd": "1.040000000",
            "fired_at": None,
        }
        wait_for(
            lambda: worker.metrics()["usage_stream_budget_alerts_undelivered"] == 0,
            30,
            "the undelivered gauge to fall",
        )
        assert worker.metrics()["usage_stream_budget_alerts_total{result=delivered}"] == 1
        assert alerts(stack) == [
            ("org-a", last_month, 50, 650_000_000, 1_000_000_000, 1),
            ("org-a", month, 50, 520_000_000, 1_000_000_000, 1),
            ("org-a", month, 100, 1_040_000_000, 1_000_000_000, 1),
        ]
        # every alert went out once: three POSTs in all
        time.sleep(4 * INTERVAL)
        assert len(receiver.received) == 3

        listed = orjson.loads(stack.cli("budget", "list", "--format", "json").stdout)
        (org_a,) = listed["budgets"]
        assert org_a["spent_usd"] == "1.040000000" and org_a["used_pct"] == "104.0"
        assert [(a["threshold_pct"], a["delivered"]) for a in org_a["alerts"]] == [
            (50, True),
            (100, True),
        ]
        assert worker.stop() == 0
        # the webhook's path is a token: logged as scheme://host:port/… only, also when
        # its deliveries failed
        logs = "".join(w.log_path.read_text(errors="replace") for w in stack.workers)
        assert "not delivered to http://127.0.0.1" in logs
        assert "s3cr3t-token" not in logs
    finally:
        receiver.stop()


def test_a_late_event_that_crosses_a_threshold_fires_it(stack: Stack) -> None:
    today = local_today()
    closed = today - timedelta(days=2)  # closed by the wall clock already
    receiver = Receiver().start()
    try:
        stack.env["BUDGET_WEBHOOK_URL"] = receiver.url  # no --webhook: the default one
        worker = stack.worker().start()
        worker.wait_assigned()
        done = stack.cli("budget", "set", "org-b", "--monthly-usd", "1", "--alert-at", "80")
        assert done.returncode == 0, done.stderr
        publish(stack, [event("b-1", "org-b", closed, "0.6")])  # 78 %
        settled(stack, 1)
        wait_for(
            lambda: stack.query(
                "SELECT 1 FROM usage_daily WHERE usage_date = ?", (closed.isoformat(),)
            ),
            30,
            "the day closed",
        )
        time.sleep(4 * INTERVAL)
        assert receiver.received == []
        late_before = worker.metrics()["usage_stream_events_late_total"]
        publish(stack, [event("b-2", "org-b", closed, "0.1", second=5)])  # 91 %
        wait_for(lambda: len(receiver.received) == 1, 60, "the late event's alert")
        assert worker.metrics()["usage_stream_events_late_total"] == late_before + 1
        assert receiver.bodies[0] | {"fired_at": None} == {
            "client_org_id": "org-b",
            "usage_month": month_of(closed),
            "threshold_pct": 80,
            "limit_usd": "1.000000000",
            "spent_usd": "0.910000000",
            "fired_at": None,
        }
        fired = datetime.fromisoformat(receiver.bodies[0]["fired_at"].replace("Z", "+00:00"))
        assert fired.tzinfo is not None and fired <= datetime.now(UTC)
        assert worker.stop() == 0
    finally:
        receiver.stop()


def test_bad_budget_input_is_one_line_and_changes_nothing(stack: Stack) -> None:
    assert stack.cli("budget", "set", "org-1", "--monthly-usd", "10").returncode == 0

    def stored() -> list[tuple]:
        return stack.query("SELECT * FROM client_budgets ORDER BY 1")

    before = stored()
    cases = [
        (("set", "org-1", "--monthly-usd", "0"), "--monthly-usd must be more than 0"),
        (("set", "org-1", "--monthly-usd", "-5"), "--monthly-usd must be more than 0"),
        (("set", "org-1", "--monthly-usd", "ten"), "--monthly-usd must be a decimal"),
        (("set", "org-1", "--monthly-usd", "NaN"), "--monthly-usd must be more than 0"),
        (("set", "org-1", "--monthly-usd", "1.0000000001"), "--monthly-usd has more than 9"),
        (("set", "org-1", "--monthly-usd", "1e10"), "--monthly-usd must be more than 0"),
        (("set", "org-1", "--monthly-usd", "5", "--alert-at", "50,x"), "--alert-at must be"),
        (("set", "org-1", "--monthly-usd", "5", "--alert-at", "0"), "--alert-at percentages"),
        (("set", "org-1", "--monthly-usd", "5", "--alert-at", "80,80"), "--alert-at lists"),
        (("set", "org-1", "--monthly-usd", "5", "--webhook", "ftp://x/y"), "--webhook must be"),
        (("set", "org-1", "--monthly-usd", "5", "--webhook", "http://"), "--webhook must be"),
        (("set", "x" * 129, "--monthly-usd", "5"), "ORG (client_org_id) must be 1-128"),
        (("set", "org-1"), "budget set: Missing option '--monthly-usd'"),
        (("set", "org-1", "--monthly-usd", "5", "--bogus"), "budget set: No such option"),
        (("rm", "org-404"), "no budget for 'org-404'"),
        (("frobnicate",), "budget: No such command 'frobnicate'"),
    ]
    for args, expected in cases:
        line = one_line_error(stack.cli("budget", *args))
        assert line.startswith(f"usage-stream: {expected}"), (args, line)
    assert stored() == before
    assert stack.cli("budget", "rm", "org-1").returncode == 0
    assert stored() == []


def test_removing_a_budget_drops_its_undelivered_alerts(stack: Stack) -> None:
    """``budget rm`` while an alert waits for a receiver that is down: the alert is
    dropped (kept on record, never sent: not to the budget's webhook once it is back, not
    to ``BUDGET_WEBHOOK_URL``), the undelivered gauge falls to 0, and an alert delivered
    before stays as it was."""
    today = local_today()
    month = month_of(today)
    receiver = Receiver().start()  # the budget's own webhook
    fallback = Receiver().start()  # BUDGET_WEBHOOK_URL: where a budget-less alert went
    try:
        stack.env["BUDGET_WEBHOOK_URL"] = fallback.url
        worker = stack.worker().start()
        worker.wait_assigned()
        done = stack.cli(
            "budget", "set", "org-r", "--monthly-usd", "1", "--alert-at", "50,100",
            "--webhook", receiver.url,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        publish(stack, [event("r-1", "org-r", today, "0.5")])  # 65 %: 50 % delivered
        wait_for(lambda: len(receiver.received) == 1, 60, "the 50 % alert")

        receiver.stop()
        publish(stack, [event("r-2", "org-r", today, "0.35", second=1)])  # 110 %
        wait_for(
            lambda: (
                stack.query(
                    "SELECT attempts >= 1 FROM budget_alerts WHERE threshold_pct = 100"
                    " AND delivered = 0 AND last_error IS NOT NULL"
                )
                == [(1,)]
            ),
            60,
            "the 100 % alert to fail",
        )
        wait_for(
            lambda: worker.metrics()["usage_stream_budget_alerts_undelivered"] == 1,
            30,
            "the undelivered gauge at 1",
        )

        removed = stack.cli("budget", "rm", "org-r")
        assert removed.returncode == 0, removed.stderr
        assert removed.stdout.decode().strip() == (
            "budget removed for org-r (1 undelivered alert dropped)"
        )
        ((attempts,),) = stack.query("SELECT attempts FROM budget_alerts WHERE threshold_pct = 100")
        # kept on record: the delivered one as it was, the undelivered one dropped
        assert stack.query(
            "SELECT usage_month, threshold_pct, delivered, dropped_at IS NOT NULL, last_error"
            " FROM budget_alerts ORDER BY threshold_pct"
        ) == [
            (month, 50, 1, 0, None),
            (month, 100, 0, 1, "dropped: budget removed before delivery"),
        ]
        wait_for(
            lambda: worker.metrics()["usage_stream_budget_alerts_undelivered"] == 0,
            30,
            "the undelivered gauge back to 0",
        )
        assert "usage_stream_budget_used_ratio{client_org_id=org-r}" not in worker.metrics()

        # the receiver is back: another client's alert reaches it, the dropped one never
        receiver.start()
        done = stack.cli(
            "budget", "set", "org-s", "--monthly-usd", "1", "--alert-at", "50",
            "--webhook", receiver.url,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        publish(stack, [event("s-1", "org-s", today, "0.5")])
        wait_for(lambda: len(receiver.received) == 2, 60, "org-s's alert")
        # past the dropped one's next retry (backoff 1, 2, 4 … 60 s)
        time.sleep(min(60, 2 ** max(attempts - 1, 0)) + 4 * INTERVAL)
        assert [(b["client_org_id"], b["threshold_pct"]) for b in receiver.bodies] == [
            ("org-r", 50),
            ("org-s", 50),
        ]
        assert fallback.received == []
        assert stack.query("SELECT attempts FROM budget_alerts WHERE threshold_pct = 100") == [
            (attempts,)
        ]
        assert worker.metrics()["usage_stream_budget_alerts_undelivered"] == 0
        # set again this month: the dropped threshold stays fired (once per month)
        done = stack.cli("budget", "set", "org-r", "--monthly-usd", "1", "--alert-at", "50,100")
        assert done.returncode == 0, done.stderr
        time.sleep(4 * INTERVAL)
        assert fallback.received == [] and len(receiver.received) == 2
        assert worker.stop() == 0
    finally:
        receiver.stop()
        fallback.stop()


def test_a_receiver_that_hangs_never_blocks_billing(stack: Stack) -> None:
    """A receiver that accepts the POST and answers only after HTTP_TIMEOUT_SECONDS:
    the attempt fails with the timeout as its last_error, billing goes on exactly
    meanwhile, and the alert is delivered once the receiver answers in time."""
    today = local_today()
    closed = today - timedelta(days=2)
    receiver = Receiver().start()
    receiver.hang_seconds = 3.0  # past the 1 s timeout below
    try:
        worker = stack.worker(HTTP_TIMEOUT_SECONDS="1").start()
        worker.wait_assigned()
        done = stack.cli(
            "budget", "set", "org-h", "--monthly-usd", "1", "--alert-at", "50",
            "--webhook", receiver.url,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        crossing = event("h-0", "org-h", today, "0.5")  # 65 %
        publish(stack, [crossing])

        def alert() -> list[tuple]:
            return stack.query(
                "SELECT delivered, attempts, last_error FROM budget_alerts"
                " WHERE client_org_id = 'org-h' AND threshold_pct = 50"
            )

        wait_for(
            lambda: (rows := alert()) and rows[0][0] == 0 and rows[0][1] >= 1,
            60,
            "a delivery attempt to time out",
        )
        assert alert()[0][2] == "no answer within 1 s"
        assert receiver.hung and receiver.received == []

        # billing while the receiver hangs: a closed day of three clients, exact
        events = [
            event(
                f"h-{n}",
                f"org-{'hij'[n % 3]}",
                closed,
                f"0.{n * 7919 % 10**9:09d}",
                user=f"user-{n % 4}",
                tokens=(100 + n, 20 + n),
                second=n,
            )
            for n in range(1, 61)
        ]
        publish(stack, events)
        settled(stack, 61)
        truth = ground_truth(events)
        columns = ", ".join(Expected._fields)
        wait_for(
            lambda: (
                {
                    tuple(row[:4]): Expected(*row[4:])
                    for row in stack.query(
                        f"SELECT client_org_id, user_id, model, usage_date, {columns}"
                        " FROM usage_daily WHERE usage_date = ?",
                        (closed.isoformat(),),
                    )
                }
                == truth
            ),
            60,
            "the closed day billed exactly",
        )
        (row,) = alert()
        assert row[0] == 0 and row[2] == "no answer within 1 s", row
        assert receiver.received == []

        receiver.hang_seconds = 0
        wait_for(lambda: len(receiver.received) == 1, 90, "the alert once the receiver answers")
        assert receiver.bodies[0] | {"fired_at": None} == {
            "client_org_id": "org-h",
            "usage_month": month_of(today),
            "threshold_pct": 50,
            "limit_usd": "1.000000000",
            "spent_usd": "0.650000000",
            "fired_at": None,
        }
        wait_for(lambda: alert()[0][0] == 1, 30, "the delivery recorded")
        delivered, attempts, last_error = alert()[0]
        assert attempts >= 2 and last_error is None
        assert worker.metrics()["usage_stream_budget_alerts_total{result=failed}"] >= 1
        assert worker.stop() == 0
    finally:
        receiver.hang_seconds = 0
        receiver.stop()
