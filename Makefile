# The README's two commands: `make run` and `make test`. Both install what they need first.
#   make run   - the Label Studio ML backend on port 9090 (gunicorn; small SAM unless configured)
#   make test  - unit tests, backend tests and the end-to-end test against a real Label Studio,
#                which lives in its own venv (.venv-ls: it pins Django and its own SDK), and the
#                browser test of the labeling screen (Debian's chromium, installed with apt-get)
#   make test-fast - the unit tests only (no Label Studio, browser, servers, Ray or subprocesses)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LS_VENV := .venv-ls
LS_VERSION := 1.23.2
LS_STAMP := $(LS_VENV)/.installed-$(LS_VERSION)
PORT ?= 9090
# The browser test drives Debian's chromium through Playwright (a browser build that Playwright
# would download is not used); apt-get needs root, sudo otherwise.
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test test-fast install install-ls install-chromium demo bench

# --no-build-isolation, SAM2_BUILD_CUDA=0: the sam2 source distribution (and hydra's antlr4, iopath)
# are built with the venv's setuptools and torch, without sam2's optional CUDA extension.
$(STAMP): requirements.txt requirements-dev.txt requirements-ray.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools
	SAM2_BUILD_CUDA=0 $(PY) -m pip install --quiet --no-build-isolation -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

$(LS_STAMP):
	test -x $(LS_VENV)/bin/python || $(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LS_VENV)/bin/python -m pip install --quiet label-studio==$(LS_VERSION)
	touch $(LS_STAMP)

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium

install: $(STAMP)

install-chromium: $(CHROMIUM)

install-ls: $(LS_STAMP)

run: $(STAMP)
	PORT=$(PORT) $(PY) -m backend

demo: $(STAMP)
	$(PY) scripts/demo.py

bench: $(STAMP)
	$(PY) scripts/bench_backend.py

# STABLE_SAM_E2E=require: the end-to-end tests fail (instead of skipping) without Label Studio,
# Chromium or Playwright.
test: $(STAMP) $(LS_STAMP) $(CHROMIUM)
	STABLE_SAM_E2E=require LABEL_STUDIO_BIN=$(CURDIR)/$(LS_VENV)/bin/label-studio $(PY) -m pytest -q tests

# What to run while working: tests marked neither e2e (Label Studio, Chromium) nor slow (servers,
# Ray, training jobs, CLI subprocesses); installs neither Label Studio nor Chromium. Not CI's target.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not e2e and not slow" tests
