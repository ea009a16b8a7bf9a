# Shortcuts for the scripts in deploy/local (which work without make on a fresh machine).
.PHONY: run test lint bench bench-transitions
run:
	bash deploy/local/run.sh
test:
	bash deploy/local/test.sh
lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy
# The whole benchmark on one embedded broker (floors, worker file/InfluxDB, replay); results
# in bench/results/latest.{json,png}. Small runs: make bench BENCH_ARGS="--events 50000"
bench:
	.venv/bin/python bench/run.py $(BENCH_ARGS)
# The transitions benchmark (issue 20): cold start, SIGTERM/SIGKILL restart, a worker joining
# and leaving under load, on one embedded broker with 1M events of history; the worker's
# default group timeouts. Results in bench/results/transitions.json. Small or other runs:
# make bench-transitions BENCH_ARGS="--events 50000 --session-timeout 10 --tree ../other"
bench-transitions:
	.venv/bin/python bench/transitions.py $(BENCH_ARGS)
