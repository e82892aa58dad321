# The README's two commands: `make run` and `make test`. Both install what they need first.
#   make run   - the Label Studio ML backend on port 9090 (gunicorn; small SAM unless configured)
#   make test  - unit tests, backend tests and the end-to-end test against a real Label Studio,
#                which lives in its own venv (.venv-ls: it pins Django and its own SDK)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LS_VENV := .venv-ls
LS_VERSION := 1.23.2
LS_STAMP := $(LS_VENV)/.installed-$(LS_VERSION)
PORT ?= 9090

.PHONY: run test install install-ls demo bench

$(STAMP): requirements.txt requirements-dev.txt requirements-ray.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

$(LS_STAMP):
	test -x $(LS_VENV)/bin/python || $(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LS_VENV)/bin/python -m pip install --quiet label-studio==$(LS_VERSION)
	touch $(LS_STAMP)

install: $(STAMP)

install-ls: $(LS_STAMP)

run: $(STAMP)
	PORT=$(PORT) $(PY) -m backend

demo: $(STAMP)
	$(PY) scripts/demo.py

bench: $(STAMP)
	$(PY) scripts/bench_backend.py

# STABLE_SAM_E2E=require: the end-to-end test fails (instead of skipping) without Label Studio.
test: $(STAMP) $(LS_STAMP)
	STABLE_SAM_E2E=require LABEL_STUDIO_BIN=$(CURDIR)/$(LS_VENV)/bin/label-studio $(PY) -m pytest -q tests
