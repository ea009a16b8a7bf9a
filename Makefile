# Shortcuts for the scripts in deploy/local (which work without make on a fresh machine).
.PHONY: run test lint bench
run:
	bash deploy/local/run.sh
test:
	bash deploy/local/test.sh
lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check .
# The whole benchmark on one embedded broker (floors, worker file/InfluxDB, replay); results
# in bench/results/latest.{json,png}. Small runs: make bench BENCH_ARGS="--events 50000"
bench:
	.venv/bin/python bench/run.py $(BENCH_ARGS)
