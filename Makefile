# halb: the two commands a fresh machine needs are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv demo test test-unit test-integration bench bench-control chaos fuzz fuzz-http fuzz-tcp fuzz-tls fuzz-accesslog fuzz-api fuzz-raft lint clean status-page-screenshot

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml setup.py halb/dataplane/_fasthttp.c halb/dataplane/_tcprelay.c halb/health/_probe.c halb/dataplane/_accesslog.c | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test,report]'
	touch $(STAMP)

venv: $(STAMP)

## Start the local three-node cluster with the checkout backends (foreground, Ctrl-C stops all).
demo: $(STAMP)
	$(BIN)/halb cluster up

## Run the whole test suite (unit, integration with real processes, netns when root).
test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

test-integration: $(STAMP)
	$(BIN)/python -m pytest tests/integration $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/run.py

## Control plane at scale: 10,000 backends over 100 services on a real 3-node cluster (docs/benchmarks.md).
bench-control: $(STAMP)
	$(BIN)/python bench/control.py

## Regenerate docs/status-page.png: the browser test against a real cluster, screenshot after its drain.
status-page-screenshot: $(STAMP)
	HALB_STATUS_PAGE_SCREENSHOT=$(CURDIR)/docs/status-page.png $(BIN)/python -m pytest -q \
		tests/integration/test_status_page_browser.py

## Fuzz targets (not part of `test`): the C HTTP head parser, the C TCP relay, the C TLS record paths, the C access-log formatter, the admin API and the Raft port.
fuzz: fuzz-http fuzz-tcp fuzz-tls fuzz-accesslog fuzz-api fuzz-raft

## Memory-safety fuzz of the C HTTP head fast path under ASan + UBSan (60 s).
fuzz-http: $(STAMP)
	$(BIN)/python tests/fuzz_fasthttp.py

## Memory-safety run of the C TCP relay under ASan + UBSan: random traffic, resets, tiny buffers (60 s).
fuzz-tcp: $(STAMP)
	$(BIN)/python tests/fuzz_tcprelay.py

## Random/mutated methods, paths, headers and bodies at a real node's admin API (60 s; --seconds to change).
## Memory-safety run of the C TLS record paths (_tlsdirect.c: Direct, StreamCore) under ASan + UBSan (60 s).
fuzz-tls: $(STAMP)
	$(BIN)/python tests/fuzz_tls.py

## Memory-safety run of the C access-log formatter (_accesslog.c) under ASan + UBSan (30 s).
fuzz-accesslog: $(STAMP)
	$(BIN)/python tests/fuzz_accesslog.py --seconds 30

fuzz-api: $(STAMP)
	$(BIN)/python tests/fuzz_api.py $(FUZZ_ARGS)

## Hostile frames, prefixes, partial frames, idle floods and post-handshake garbage against one
## node of a real 3-node cluster (60 s): no election, writes keep committing, RSS bounded.
fuzz-raft: $(STAMP)
	$(BIN)/python tests/fuzz_raft.py

chaos: $(STAMP)
	$(BIN)/halb chaos run chaos/drills/*.toml --cluster local

## Cheap static checks: every module byte-compiles, every drill file validates.
lint: $(STAMP)
	$(BIN)/python -m compileall -q halb tests bench
	$(BIN)/halb chaos validate chaos/drills/*.toml

clean:
	rm -rf $(VENV) .halb build *.egg-info .pytest_cache
