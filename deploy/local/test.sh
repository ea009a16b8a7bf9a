#!/usr/bin/env bash
# The whole test suite, on real components (Tansu broker, InfluxDB 1.x, VictoriaMetrics,
# Prometheus, kcat); installs whatever is missing first. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash deploy/local/bootstrap.sh test
.venv/bin/ruff check .
set +e
# In parallel (pytest-xdist): the suite mostly waits (group joins, outages held for 30 s,
# polling), under half a core busy on average, so 4 processes on a 2-core machine cut
# pytest's wall time ~2.9x (1209 s -> 423 s measured). Each test has its own topic,
# group, data dir and ports, and each xdist process its own broker. worksteal: an idle
# process takes tests queued behind a long one. TEST_WORKERS=0 (or -n0, e.g. for --pdb)
# runs serially.
.venv/bin/python -m pytest -p no:cacheprovider -n "${TEST_WORKERS:-4}" --dist worksteal "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "test.sh: pytest collected no tests: failing" >&2
  exit 1
fi
exit "$status"
