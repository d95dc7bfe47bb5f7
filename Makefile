# Two commands for a fresh Debian machine with python3 (venv) and make:
#   make demo   the gateway + Daraja simulator on 127.0.0.1, a payment in seconds
#   make test   the whole test suite
# Each creates its own virtual environment and installs pinned requirements.
PYTHON ?= python3
RUN_VENV := .venv
TEST_VENV := .venv-test

.PHONY: demo test clean

$(RUN_VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(RUN_VENV)
	$(RUN_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

$(TEST_VENV)/.installed: requirements.txt requirements-test.txt
	$(PYTHON) -m venv $(TEST_VENV)
	$(TEST_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-test.txt
	touch $@

demo: $(RUN_VENV)/.installed
	$(RUN_VENV)/bin/python mpesa_wsgi.py --demo

test: $(TEST_VENV)/.installed
	$(TEST_VENV)/bin/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(RUN_VENV) $(TEST_VENV) .pytest_cache mpesa_demo.db*
