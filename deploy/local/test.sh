#!/usr/bin/env bash
# The whole test suite, on real components (Tansu broker, InfluxDB 1.x, VictoriaMetrics,
# Prometheus, kcat); installs whatever is missing first. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash deploy/local/bootstrap.sh test
.venv/bin/ruff check .
set +e
# TEST_WORKERS=4 runs pytest in 4 processes (pytest-xdist): the suite mostly waits (group
# joins, outages held for 30 s, polling), under half a core busy on average, so on a
# 2-core machine the wall time falls ~3x (1209 s -> 351-423 s measured). Each test has its
# own topic, group, data dir and ports, and each xdist process its own broker; worksteal:
# an idle process takes tests queued behind a long one. The default stays serial (0) until
# the summary writer's shutdown race is fixed: under CPU load (4 processes, or 3 copies of
# the test at once) test_replay_killed_after_fencing_holds_the_writer_until_replayed_again
# fails every time (the writer exits 1 on SIGTERM: "cannot schedule new futures after
# shutdown", agents/summary_writer.py on_stop shuts its executor down while _apply still
# runs); then make 4 the default. -n0 is serial too (--pdb needs it).
.venv/bin/python -m pytest -p no:cacheprovider -n "${TEST_WORKERS:-0}" --dist worksteal "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "test.sh: pytest collected no tests: failing" >&2
  exit 1
fi
exit "$status"
