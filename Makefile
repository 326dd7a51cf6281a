# make demo / make test work on a fresh machine: they install what is missing first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: setup test demo bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install-system-deps.sh
	./scripts/install-system-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip >/dev/null
	$(PY) -m pip install -q -e '.[test]'
	touch $@

test: setup
	$(PY) -m pytest -q

demo: setup
	$(PY) demo/run_demo.py

bench: setup
	$(PY) bench/proxy.py
	$(PY) bench/launch.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .hypothesis
