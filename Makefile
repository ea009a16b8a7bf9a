# Shortcuts for the scripts in deploy/local (which work without make on a fresh machine).
.PHONY: run test lint bench
run:
	bash deploy/local/run.sh
test:
	bash deploy/local/test.sh
lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check .
