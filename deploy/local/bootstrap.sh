#!/usr/bin/env bash
# Install what usage-stream needs on a fresh Debian machine (run as root), idempotently:
#   bootstrap.sh run    python3 + venv + the package (enough for `usage-stream dev`)
#   bootstrap.sh test   also the real servers the tests use (InfluxDB 1.x, VictoriaMetrics,
#                       Prometheus, kcat, libfaketime) and the test extras
set -euo pipefail
cd "$(dirname "$0")/../.."
mode="${1:-run}"

apt_packages=()
need() { command -v "$1" >/dev/null 2>&1 || apt_packages+=("$2"); }

need python3 python3
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || apt_packages+=(python3-venv)
need gcc gcc
if [ "$mode" = test ]; then
  need influxd influxdb
  need victoria-metrics victoria-metrics
  need prometheus prometheus
  need promtool prometheus
  need kcat kcat
  # libfaketime: a worker whose clock runs hours ahead (tests/reliability/test_verdicts.py)
  compgen -G '/usr/lib/*/faketime/libfaketime.so.1' >/dev/null || apt_packages+=(libfaketime)
fi
if [ ${#apt_packages[@]} -gt 0 ]; then
  echo "bootstrap: apt-get install ${apt_packages[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${apt_packages[@]}" >/dev/null
fi

python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "bootstrap: Python >= 3.11 is required, found $(python3 --version)" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
extras=""
[ "$mode" = test ] && extras="[test]"
stamp=".venv/.installed-${mode}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".${extras}"
  touch "$stamp"
fi
