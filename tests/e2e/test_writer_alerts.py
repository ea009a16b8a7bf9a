"""The summary writer's alerts (deploy/prometheus/alerts.yml), under promtool's rule
engine over modelled series: each fires on what it is for and stays quiet otherwise."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from tests.e2e.test_prometheus import ALERTS, binary

W = "w1:6066"


def series(name: str, labels: dict[str, str], values: str) -> dict:
    inner = ",".join(f'{k}="{v}"' for k, v in {"instance": W, **labels}.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


def fires(alert: str, at: str, expected: list[dict]) -> dict:
    return {"eval_time": at, "alertname": alert, "exp_alerts": expected}


def test_summary_writer_alerts(tmp_path: Path) -> None:
    held = "usage_stream_summary_writer_held_partitions"
    rejected = "usage_stream_batch_log_records_rejected_total"
    tests = {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "name": "a writer that falls behind and stays behind",
                "interval": "1m",
                "input_series": [
                    series("usage_stream_summary_writer_lag_records", {}, "0 50 5000x30"),
                ],
                "alert_rule_test": [
                    fires("UsageStreamSummaryWriterLagging", "10m", []),
                    fires(
                        "UsageStreamSummaryWriterLagging",
                        "25m",
                        [
                            {
                                "exp_labels": {"severity": "warning", "instance": W},
                                "exp_annotations": {
                                    "summary": "the summary writer is 5k batch-log records"
                                    " behind for 15 min: bills are late"
                                },
                            }
                        ],
                    ),
                ],
            },
            {
                "name": "a replay that waits briefly, then one that died after fencing",
                "interval": "1m",
                "input_series": [
                    series(held, {"reason": "replay_fence"}, "0 4 4 0x10 4x30"),
                    series(held, {"reason": "log_refused"}, "0x45"),
                ],
                "alert_rule_test": [
                    fires("UsageStreamSummaryWriterBlocked", "5m", []),
                    fires(
                        "UsageStreamSummaryWriterBlocked",
                        "30m",
                        [
                            {
                                "exp_labels": {
                                    "severity": "critical",
                                    "instance": W,
                                    "reason": "replay_fence",
                                },
                                "exp_annotations": {
                                    "summary": "the summary writer holds 4 batch-log"
                                    " partitions (replay_fence): no bills are added there",
                                    "description": "replay_fence: a replay stopped after"
                                    " fencing (run it again); log_refused: the batch log is"
                                    " not the one the DB followed (see /ready);"
                                    " stepped_down: another summary writer owns the log.",
                                },
                            }
                        ],
                    ),
                ],
            },
            {
                "name": "records off the chain now and then are normal; a missing part is not",
                "interval": "1m",
                "input_series": [
                    series(rejected, {"reason": "not_in_chain"}, "0 1 2 3x60"),
                    series(rejected, {"reason": "missing_part"}, "0x30 1x30"),
                ],
                "alert_rule_test": [
                    fires("UsageStreamBatchLogRecordsOffChain", "20m", []),
                    fires("UsageStreamBatchLogRecordsRejected", "20m", []),
                    fires(
                        "UsageStreamBatchLogRecordsRejected",
                        "35m",
                        [
                            {
                                "exp_labels": {
                                    "severity": "critical",
                                    "instance": W,
                                    "reason": "missing_part",
                                },
                                "exp_annotations": {
                                    "summary": "the summary writer rejected batch-log records"
                                    " (missing_part): their sums are not billed"
                                },
                            }
                        ],
                    ),
                ],
            },
        ],
    }
    path = tmp_path / "writer_alerts_test.yml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = subprocess.run(
        [binary("promtool"), "test", "rules", str(path)], capture_output=True, timeout=120
    )
    assert result.returncode == 0, (result.stdout + result.stderr).decode()
