# q3lab: `make test` and `make demo` are the two commands; `make venv` is what both need.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.q3lab-installed
NBVAL_ARGS ?=

.PHONY: venv test demo notebooks clean e2e chromium lab

venv: $(STAMP)

# Reinstall only when pyproject.toml changes. torch goes first and with exactly this spec: it comes from a
# wheel on local disk, while a looser spec (or torch pulled in by another package first) downloads gigabytes.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev,reference,omni]'
	touch $(STAMP)

# The unit tests, and nbval re-running every committed notebook and comparing its outputs.
NBVAL := --nbval --nbval-current-env --nbval-sanitize-with notebooks/nbval_sanitize.cfg
test: venv
	$(PY) -m pytest -q tests notebooks $(NBVAL) $(NBVAL_ARGS)

# The main job: every notebooks/NN_*.py headless (papermill) on the embedded data/mini, and the routing
# notebooks (05, 06) again on data/mini128 when it is there; executed notebooks go to out/notebooks, figures to
# figures/. `q3lab notebooks --checkpoint PATH --out DIR` does it for any checkpoint (figures to DIR/figures).
demo: venv
	$(VENV)/bin/q3lab notebooks

# Refresh the committed notebooks: pair each jupytext source notebooks/NN_*.py with its NN_*.ipynb (the cells),
# then execute it in place (the outputs). Run after editing a notebook's .py or the package.
notebooks: venv
	$(VENV)/bin/jupytext --to ipynb --update notebooks/[0-9][0-9]_*.py
	$(VENV)/bin/q3lab notebooks --in-place

# JupyterLab in headless Chromium (tests/e2e): notebooks run, figures and widgets render. Screenshots: out/e2e/.
CHROMIUM ?= /usr/bin/chromium
e2e: venv chromium
	Q3LAB_E2E=1 Q3LAB_CHROMIUM=$(CHROMIUM) $(PY) -m pytest -q tests/e2e --durations=5

# Debian's Chromium (Playwright cannot download its own browsers here); installed with apt-get when root.
chromium:
	@test -x $(CHROMIUM) && exit 0; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
		echo "no Chromium at $(CHROMIUM): run 'apt-get install -y chromium' as root (or set CHROMIUM=...)"; exit 1; fi; \
	for try in 1 2 3; do \
		DEBIAN_FRONTEND=noninteractive apt-get -o Acquire::Retries=3 -o DPkg::Lock::Timeout=300 update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get -o Acquire::Retries=3 -o DPkg::Lock::Timeout=300 install -y -q chromium && \
		test -x $(CHROMIUM) && exit 0; \
		echo "apt-get chromium: try $$try failed"; \
	done; exit 1

# Open the notebooks in JupyterLab (prints the URL with its token).
lab: venv
	$(VENV)/bin/jupyter lab notebooks/ $(if $(filter 0,$(shell id -u)),--allow-root)

# Leaves .venv alone (rebuilding it takes a minute); `rm -rf .venv` for a fresh one.
clean:
	rm -rf out build *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
