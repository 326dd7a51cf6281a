# make demo / make test work on a fresh machine: they install what is missing first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: setup lint test demo bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install-system-deps.sh
	./scripts/install-system-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip >/dev/null
	$(PY) -m pip install -q -e '.[test,lint]'
	touch $@

# Lint, types and the layer contracts (pyproject.toml: [tool.ruff], [tool.mypy], [tool.importlinter]):
# all three run, so one pass shows every finding; any finding fails the target.
lint: setup
	@rc=0; \
	$(VENV)/bin/ruff check src tests bench demo || rc=1; \
	$(VENV)/bin/mypy || rc=1; \
	$(VENV)/bin/lint-imports || rc=1; \
	exit $$rc

test: lint
	$(PY) -m pytest -q

demo: setup
	$(PY) demo/run_demo.py

bench: setup
	$(PY) bench/proxy.py
	$(PY) bench/launch.py
	$(PY) bench/workspace_check.py
	$(PY) bench/egress.py
	$(PY) bench/relay_copy.py
	$(PY) bench/terminal.py
	$(PY) bench/audit.py
	$(PY) bench/https_inspection.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .hypothesis
