# callctl: the README's two commands are `make demo` and `make test`.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PBX   ?= asterisk
# The lab's script for PBX=asterisk (default) or PBX=freeswitch.
LAB_SH := $(if $(filter freeswitch,$(PBX)),lab/freeswitch.sh,lab/lab.sh)

.PHONY: deps venv test test-cluster test-fast demo bench lab-up lab-down lab-status clean

deps:
	@bash scripts/deps.sh

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

## Whole suite: unit, PostgreSQL and SQLite, FastAGI and ESL protocols, SIPp, real Asterisk
## and FreeSWITCH labs (FreeSWITCH is built once first: about 3 min, cached).
test: deps venv
	bash lab/freeswitch.sh build
	$(PY) -m pytest -q -rfEs

## Many nodes: failover of replicated PostgreSQL under SIPp load, in network namespaces
## (also part of `make test`).
test-cluster: deps venv
	$(PY) -m pytest -q -rfEs -s -m cluster

## Everything but the Asterisk lab (quick loop while coding).
test-fast: deps venv
	$(PY) -m pytest -q -m 'not lab'

## The main job: real Asterisk, the daemon on SQLite, sample tenants, SIPp calls, CDRs printed.
# lab/ and bench/ run as modules from the repository root (they import lab.sipp, lab.harness).
demo: deps venv
	$(PY) -m lab.demo --pbx $(PBX)

## SIPp load through the real Asterisk: callctl against a minimal FastAGI, side by side.
bench: deps venv
	$(PY) -m bench.bench

lab-up: deps
	bash $(LAB_SH) up

lab-down:
	bash $(LAB_SH) down

lab-status:
	bash $(LAB_SH) status

clean:
	-bash lab/lab.sh down
	-bash lab/freeswitch.sh down
	rm -rf var .pytest_cache
