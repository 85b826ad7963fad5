# Sigma: build, check and demo.  `make demo` runs it, `make test` checks it.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
# Prerequisites run in the order they are listed (system packages before the venv).
.NOTPARALLEL:

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Debian packages sigma needs at run and test time: the engine, etcd, the static busybox the
# images are built from, the lab's registry, `ip` and `bridge`, iptables (the lab's underlay
# bridge needs a FORWARD rule), curl, venv support for python3, and for SSD volumes mkfs.ext4 and
# blkid (e2fsprogs) and losetup (mount); headless chromium and its driver for the console tests.
APT_PACKAGES := docker.io etcd-server busybox-static docker-registry iproute2 iptables curl python3-venv e2fsprogs mount chromium chromium-driver redis-server redis-tools

# Only the source directories that exist (bench/ may not yet).
LINT_DIRS := $(wildcard sigmad sigmactl tests bench)

.PHONY: help deps system-deps venv lock lint unit test dist demo demo-stop clean

help:
	@echo "make demo       (root) build a 3-host lab here, or reuse it (sigmad lab up: netns + dockerd"
	@echo "                + agent per host, registry, etcd, master), run 6 replicas of the example app"
	@echo "                web across the hosts and fetch the others from inside web-0 over the overlay"
	@echo "make demo-stop  delete web and remove the lab (sigmad lab down); check nothing is left"
	@echo "make test       lint (ruff, mypy) and run unit + integration tests (root)"
	@echo "make unit       the unit tests only (no root, no etcd, no Docker: fakes)"
	@echo "make lint       ruff and mypy only"
	@echo "make deps       install missing system packages and the .venv (from requirements.lock)"
	@echo "make lock       update requirements.lock (pinned, with hashes) from setup.cfg"
	@echo "make dist       build the wheel and the sdist into dist/ (scripts/install.sh installs"
	@echo "                the wheel on a host: docs/operations.md)"
	@echo "make clean      remove .venv and caches"

deps: system-deps venv

# Installs only what is missing; a package counts as present when its command is on PATH
# (e.g. a docker installed some other way) or dpkg says it is installed.
system-deps:
	@missing=(); \
	have() { dpkg -s "$$1" >/dev/null 2>&1; }; \
	for pkg in $(APT_PACKAGES); do \
	  case "$$pkg" in \
	    docker.io)       command -v dockerd >/dev/null 2>&1 && command -v docker >/dev/null 2>&1 && continue ;; \
	    etcd-server)     command -v etcd >/dev/null 2>&1 && continue ;; \
	    docker-registry) command -v docker-registry >/dev/null 2>&1 && continue ;; \
	    iproute2)        command -v ip >/dev/null 2>&1 && command -v bridge >/dev/null 2>&1 && continue ;; \
	    iptables)        command -v iptables >/dev/null 2>&1 && continue ;; \
	    curl)            command -v curl >/dev/null 2>&1 && continue ;; \
	    python3-venv)    $(PYTHON) -c 'import ensurepip, venv' >/dev/null 2>&1 && continue ;; \
	    e2fsprogs)       command -v mkfs.ext4 >/dev/null 2>&1 && command -v blkid >/dev/null 2>&1 && continue ;; \
	    mount)           command -v losetup >/dev/null 2>&1 && continue ;; \
	    chromium)        command -v chromium >/dev/null 2>&1 && continue ;; \
	    chromium-driver) command -v chromedriver >/dev/null 2>&1 && continue ;; \
	  esac; \
	  have "$$pkg" || missing+=("$$pkg"); \
	done; \
	if (( $${#missing[@]} )); then \
	  echo "installing system packages: $${missing[*]}"; \
	  if [[ $$(id -u) -ne 0 ]]; then echo "error: run as root to install $${missing[*]}" >&2; exit 1; fi; \
	  apt-get update; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y "$${missing[@]}"; \
	fi

venv: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Re-installed only when the lock or the package metadata changes (editable: code changes need
# nothing). Every dependency comes from requirements.lock, pinned with its hashes.
$(STAMP): requirements.lock setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --require-hashes -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

# The one command that updates requirements.lock (after a change to setup.cfg's requirements).
lock: | $(BIN)/python
	$(BIN)/pip install --quiet pip-tools
	$(BIN)/pip-compile --quiet --generate-hashes --extra test --strip-extras --allow-unsafe \
	  --no-emit-index-url --no-emit-find-links -o requirements.lock setup.cfg

lint: venv
	$(BIN)/ruff check $(LINT_DIRS)
	$(BIN)/mypy

# Unit tests run on fakes (tests/fakes): no root, no etcd, no Docker.
unit: venv
	$(BIN)/pytest -q tests/unit

# The tests start their own etcd and dockerd: they need root.
test: deps
	$(MAKE) --no-print-directory lint
	$(BIN)/pytest -q

# The wheel (pip builds it in an isolated environment) and the sdist (setuptools, in the
# venv), into $(DIST).
DIST ?= dist
dist: venv
	rm -rf $(DIST) && mkdir -p $(DIST)
	$(BIN)/pip wheel --quiet --disable-pip-version-check --no-deps -w $(DIST) .
	$(BIN)/python -c 'import sys; from setuptools import build_meta; build_meta.build_sdist(sys.argv[1])' $(DIST)
	@ls -l $(DIST)

demo: deps
	scripts/demo.sh

demo-stop:
	scripts/demo.sh stop

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build dist *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
