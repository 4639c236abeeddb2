# q3lab: `make test` and `make demo` are the two commands; `make venv` is what both need.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.q3lab-installed
NBVAL_ARGS ?=
DEMO := out/demo

.PHONY: venv test demo clean

venv: $(STAMP)

# Reinstall only when pyproject.toml changes. torch goes first and with exactly this spec: it comes from a
# wheel on local disk, while a looser spec (or torch pulled in by another package first) downloads gigabytes.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev,reference]'
	touch $(STAMP)

test: venv
	$(PY) -m pytest -q tests $(NBVAL_ARGS)

demo: venv
	rm -rf $(DEMO)
	$(VENV)/bin/q3lab synth $(DEMO)/ckpt --preset tiny
	$(VENV)/bin/q3lab audit $(DEMO)/ckpt
	$(VENV)/bin/q3lab extract $(DEMO)/ckpt $(DEMO)/store --no-progress
	$(VENV)/bin/q3lab extract --verify $(DEMO)/store --no-progress

# Leaves .venv alone (rebuilding it takes a minute); `rm -rf .venv` for a fresh one.
clean:
	rm -rf out build *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
