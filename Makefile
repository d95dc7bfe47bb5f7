# Two commands for a fresh Debian machine with python3 (venv) and make:
#   make demo   the gateway + Daraja simulator on 127.0.0.1, a payment in seconds
#   make test   the whole test suite
#   make bench  the benchmark against Flask and Falcon versions (needs wrk: apt-get install wrk)
#   make soak   the long runs, not part of `make test` (under an hour on 2 cores): the SIGKILL
#               crash-restart test for SOAK_CRASH_CYCLES cycles (100) under load, and the
#               Hypothesis properties, ledger state machine and OpenAPI contract with
#               SOAK_EXAMPLES examples each (10000); prints their figures at the end
# Each creates its own virtual environment and installs pinned requirements.
PYTHON ?= python3
RUN_VENV := .venv
TEST_VENV := .venv-test
BENCH_VENV := .venv-bench
SOAK_CRASH_CYCLES ?= 100
SOAK_EXAMPLES ?= 10000
SOAK_TESTS := tests/test_crash.py tests/test_properties.py tests/test_ledger_state.py \
	tests/test_openapi_contract.py

.PHONY: demo test soak bench screenshots clean

$(RUN_VENV)/.installed: requirements.txt requirements-initiator.txt
	$(PYTHON) -m venv $(RUN_VENV)
	$(RUN_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-initiator.txt
	touch $@

$(TEST_VENV)/.installed: requirements.txt requirements-test.txt requirements-postgres.txt \
		requirements-examples.txt requirements-initiator.txt
	$(PYTHON) -m venv $(TEST_VENV)
	$(TEST_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-test.txt
	touch $@

$(BENCH_VENV)/.installed: requirements.txt requirements-test.txt requirements-postgres.txt \
		requirements-examples.txt requirements-initiator.txt requirements-bench.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-bench.txt
	touch $@

demo: $(RUN_VENV)/.installed
	$(RUN_VENV)/bin/python mpesa_wsgi.py --demo

# Two workers, each taking whole test files (their module fixtures and servers stay in one
# process); PYTEST_ARGS="-n 0" runs it in one process.
test: $(TEST_VENV)/.installed
	$(TEST_VENV)/bin/python -m pytest -n 2 --dist loadfile $(PYTEST_ARGS)

soak: $(TEST_VENV)/.installed
	SOAK_CRASH_CYCLES=$(SOAK_CRASH_CYCLES) SOAK_EXAMPLES=$(SOAK_EXAMPLES) \
		$(TEST_VENV)/bin/python -m pytest --hypothesis-show-statistics $(SOAK_TESTS) $(PYTEST_ARGS)

bench: $(BENCH_VENV)/.installed
	@command -v wrk >/dev/null || { echo "wrk is needed: apt-get install wrk"; exit 1; }
	$(BENCH_VENV)/bin/python bench/run.py $(BENCH_ARGS)

# PNGs of the console's pages into docs/screenshots/ (not part of `make test`): the
# simulator and a gateway on loopback, a few demo payments, headless Debian chromium
# (apt-get install chromium chromium-driver)
screenshots: $(TEST_VENV)/.installed
	$(TEST_VENV)/bin/python -m mpesa_devtools.screenshots $(SCREENSHOTS_ARGS)

clean:
	rm -rf $(RUN_VENV) $(TEST_VENV) $(BENCH_VENV) .pytest_cache mpesa_demo.db*
