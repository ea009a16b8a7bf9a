#!/usr/bin/env bash
# The whole test suite, on real components (Tansu broker, InfluxDB 1.x, VictoriaMetrics,
# Prometheus, kcat); installs whatever is missing first. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash deploy/local/bootstrap.sh test
.venv/bin/ruff check .
set +e
.venv/bin/python -m pytest -p no:cacheprovider "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "test.sh: pytest collected no tests: failing" >&2
  exit 1
fi
exit "$status"
