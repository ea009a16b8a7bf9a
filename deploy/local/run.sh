#!/usr/bin/env bash
# The embedded default: bundled broker + worker + synthetic producer, data under ./data.
# The demo also backfills the last 3 days, so closed days (bills) are in within a minute;
# the output ends with what to look at (a `usage-stream report` command line and the
# worker's /usage URL), then a live status line. Ctrl-C stops the producer, the worker
# and the broker, in that order.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash deploy/local/bootstrap.sh run
exec .venv/bin/usage-stream dev --demo "$@"
