# The two entry points of the README. Each runs scripts/setup.sh first (a no-op once installed).
.PHONY: setup demo test lint

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/fastdpo demo

test: setup
	.venv/bin/python -m pytest -q -n 2 --dist loadfile

lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check .
