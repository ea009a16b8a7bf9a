#!/usr/bin/env bash
# The embedded default: bundled broker + worker + synthetic producer, data under ./data.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash deploy/local/bootstrap.sh run
exec .venv/bin/usage-stream dev --demo "$@"
