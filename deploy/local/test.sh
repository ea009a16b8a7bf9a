#!/usr/bin/env bash
# The whole test suite (ruff, mypy, then pytest), on real components (Tansu broker, InfluxDB 1.x, VictoriaMetrics,
# Prometheus, kcat); installs whatever is missing first. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash deploy/local/bootstrap.sh test
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy  # streams/, agents/, tables/ ([tool.mypy] in pyproject.toml)
set +e
# pytest runs in 4 processes (pytest-xdist, TEST_WORKERS): the suite mostly waits (group
# joins, outages held for 30 s, polling), under half a core busy on average, so on a
# 2-core machine the wall time falls ~3x (1209 s serially -> 361 s, 466 passed). Each test
# has its own topic, group, data dir and ports, and each xdist process its own broker;
# worksteal: an idle process takes tests queued behind a long one. The load this puts on
# the machine found two real races (a summary writer's shutdown, a hot path claiming
# records it had not read), both fixed. TEST_WORKERS=0 runs serially (--pdb needs it).
.venv/bin/python -m pytest -p no:cacheprovider -n "${TEST_WORKERS:-4}" --dist worksteal "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "test.sh: pytest collected no tests: failing" >&2
  exit 1
fi
exit "$status"
