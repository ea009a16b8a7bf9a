"""The benchmark's outputs: one line per run (events/s, ratios to the two floors, peak
RSS, state bytes, targets met or missed), the JSON file and the events/s-over-time plot.

Targets are printed next to the ratios and never fail the run: speed depends on the
machine and on what else runs on it; only wrong counts fail (see bench/run.py).
"""

from __future__ import annotations

import math
from pathlib import Path

import orjson

from bench.results import Check, RunResult

#: (what, comparison, bound): printed beside the numbers they judge
TARGETS: dict[str, tuple[str, float]] = {
    "worker_vs_noop": (">=", 5.0),
    # issue 21: with InfluxDB (a second process on the same 2 cores) 4x the Faust agent
    "worker_influx_vs_noop": (">=", 4.0),
    "worker_vs_raw": (">=", 0.1),
    "replay_vs_raw": (">=", 0.5),
    "worker_peak_rss_mb": ("<=", 600.0),
    "replay_peak_rss_mb": ("<=", 600.0),  # the replay and its reader processes
    "dedupe_bytes_per_id": ("<=", 100.0),
    # with --baseline: this commit's worker against the baseline's in the same run (issue 9's
    # "no regression for a single worker"; 5 % is this machine's run-to-run noise)
    "worker_vs_baseline": (">=", 0.95),
}


def _ratio(value: float | None, floor: RunResult | None) -> float | None:
    if value is None or floor is None or not floor.events_per_s:
        return None
    return value / floor.events_per_s


def _target(name: str, value: float | None) -> tuple[str, bool | None]:
    op, bound = TARGETS[name]
    text = f"{op}{bound:g}"
    if value is None:
        return text, None
    return text, value >= bound if op == ">=" else value <= bound


def _judged(name: str, value: float | None, unit: str = "") -> str:
    text, met = _target(name, value)
    verdict = "n/a" if met is None else ("met" if met else "MISSED")
    return f"(target {text}{unit}: {verdict})"


def floor_ratios(run: RunResult, runs: dict[str, RunResult]) -> tuple[float | None, float | None]:
    """(events/s ÷ the raw reader's, events/s ÷ the Faust no-op's)."""
    return (
        _ratio(run.events_per_s, runs.get("raw_reader")),
        _ratio(run.events_per_s, runs.get("faust_noop")),
    )


def _judged_values(run: RunResult, runs: dict[str, RunResult]) -> dict[str, float | None]:
    """The values each target of this kind of run judges."""
    vs_raw, vs_noop = floor_ratios(run, runs)
    if run.kind == "worker":
        per_id = run.details.get("dedupe_bytes_per_id")
        noop_target = "worker_influx_vs_noop" if run.name == "worker_influx" else "worker_vs_noop"
        return {
            "worker_vs_raw": vs_raw,
            noop_target: vs_noop,
            "worker_peak_rss_mb": run.peak_rss_mb,
            "dedupe_bytes_per_id": float(per_id) if isinstance(per_id, int | float) else None,
            **(
                {"worker_vs_baseline": _ratio(run.events_per_s, runs["worker_baseline"])}
                if run.name == "worker_file" and "worker_baseline" in runs
                else {}
            ),
        }
    if run.kind == "replay":
        return {"replay_vs_raw": vs_raw, "replay_peak_rss_mb": run.peak_rss_mb}
    return {}


def summary(runs: dict[str, RunResult]) -> dict[str, dict[str, object]]:
    """Per run, for the JSON: ratios to the floors and each target's verdict."""
    out: dict[str, dict[str, object]] = {}
    for name, run in runs.items():
        vs_raw, vs_noop = floor_ratios(run, runs)
        targets: dict[str, object] = {}
        for key, value in _judged_values(run, runs).items():
            text, met = _target(key, value)
            targets[key] = {"target": text, "value": value, "met": met}
        out[name] = {"vs_raw": vs_raw, "vs_noop": vs_noop, "targets": targets}
    return out


def _number(value: object, spec: str) -> str:
    return format(value, spec) if isinstance(value, int | float) else "n/a"


def run_line(run: RunResult, runs: dict[str, RunResult]) -> str:
    """One line per run: rate, both ratios, peak RSS (+ state costs), targets beside them."""
    if run.skipped:
        return f"{run.label:<38} skipped: {run.skipped}"
    if run.error:
        return f"{run.label:<38} FAILED: {run.error.splitlines()[0]}"
    vs_raw, vs_noop = floor_ratios(run, runs)
    judged = _judged_values(run, runs)

    def verdict(key: str, unit: str = "") -> str:
        return " " + _judged(key, judged[key], unit) if key in judged else ""

    kind = "worker" if run.kind == "worker" else "replay"
    parts = [
        f"{run.label:<38} {_number(run.events_per_s, '>10,.0f')} events/s",
        f"{_number(vs_raw, '.3f')}x raw" + verdict(f"{kind}_vs_raw"),
        f"{_number(vs_noop, '.2f')}x Faust no-op"
        + verdict("worker_vs_noop")
        + verdict("worker_influx_vs_noop"),
        f"peak RSS {_number(run.peak_rss_mb, ',.0f')} MB" + verdict(f"{kind}_peak_rss_mb", " MB"),
    ]
    if run.kind == "worker":
        per_unique = run.details.get("summary_db_bytes_per_unique")
        per_id = run.details.get("dedupe_bytes_per_id")
        parts.append(f"summary DB {_number(per_unique, ',.0f')} B/unique event")
        parts.append(
            f"dedupe {_number(per_id, ',.1f')} B/id" + verdict("dedupe_bytes_per_id", " B")
        )
        log = run.details.get("batch_log")
        if isinstance(log, dict):
            largest = log.get("largest_record_bytes")
            parts.append(
                f"batch log {_number(log.get('bytes_per_event'), ',.1f')} B/event, largest"
                f" record {_number(largest / 1e6 if isinstance(largest, int) else None, ',.2f')}"
                f" MB ({_number(log.get('largest_record_rows'), ',')} rows)"
            )
        if "worker_vs_baseline" in judged:
            parts.append(
                f"{_number(judged['worker_vs_baseline'], '.2f')}x baseline"
                + verdict("worker_vs_baseline")
            )
    return " | ".join(parts)


def write_json(path: Path, document: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))


def _window(points: list[tuple[float, float]]) -> float:
    """Rate window: at least 2 s, and twice the median time between progress steps.

    A worker's committed offsets advance in jumps (one transaction per batch, every few
    seconds), so a window shorter than the commit interval would read as 0 between jumps
    and as a burst at each one."""
    steps = [t for (t, n), (_, m) in zip(points[1:], points, strict=False) if n > m]
    gaps = sorted(b - a for a, b in zip(steps, steps[1:], strict=False))
    return max(2.0, 2 * gaps[len(gaps) // 2]) if gaps else 2.0


def _rates(samples: list[list[float | None]]) -> tuple[list[float], list[float], float]:
    """records/s between each sample and the latest one at least a window before it (a
    window without progress is a gap, NaN: the log scale cannot draw 0); and the window."""
    points = [(float(s[0] or 0.0), float(s[1] or 0.0)) for s in samples]
    window = _window(points)
    xs: list[float] = []
    ys: list[float] = []
    start = 0
    for t, n in points:
        while start + 1 < len(points) and t - points[start + 1][0] >= window:
            start += 1
        t0, n0 = points[start]
        if t > t0:
            xs.append(t)
            ys.append((n - n0) / (t - t0) if n > n0 else math.nan)
    return xs, ys, window


def draw(path: Path, runs: dict[str, RunResult], title: str) -> None:
    """Top: records/s over time, one line per run, each run's mean as a dashed line.
    Bottom: records done over time, where stalls show as flat stretches."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (rate_axes, done_axes) = plt.subplots(
        2, 1, figsize=(11, 9), dpi=120, sharex=True, height_ratios=[3, 2]
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, run in enumerate(r for r in runs.values() if r.events_per_s):
        color = colors[index % len(colors)]
        xs, ys, window = _rates(run.samples)
        if xs:
            rate_axes.plot(
                xs, ys, color=color, linewidth=1.3, label=f"{run.label} ({window:.0f} s windows)"
            )
        rate_axes.axhline(
            run.events_per_s,
            color=color,
            linestyle="--",
            linewidth=0.9,
            label=f"{run.label}: mean {run.events_per_s:,.0f}/s",
        )
        done_axes.plot(
            [float(s[0] or 0.0) for s in run.samples],
            [float(s[1] or 0.0) for s in run.samples],
            color=color,
            linewidth=1.3,
            label=run.label,
        )
    rate_axes.set_yscale("log")
    rate_axes.set_ylabel("records/s (log scale)")
    rate_axes.set_title(title)
    rate_axes.grid(True, which="both", alpha=0.3)
    rate_axes.legend(fontsize=7, loc="best")
    done_axes.set_ylabel("records done")
    done_axes.set_xlabel("seconds since the run's first record (replay: since the command started)")
    done_axes.grid(True, alpha=0.3)
    done_axes.legend(fontsize=7, loc="best")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


def failures(checks: list[Check], runs: dict[str, RunResult]) -> list[str]:
    """The FAIL lines: a wrong count, or a run that crashed or timed out."""
    lines = [
        f"FAIL {check.run}: {check.name}: expected {check.expected}, got {check.actual}"
        for check in checks
        if not check.ok
    ]
    lines += [f"FAIL {run.name}: {run.error.splitlines()[0]}" for run in runs.values() if run.error]
    return lines
