# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# pytest-xdist processes: the suite's end-to-end tests wait on their subprocesses much of the time
TEST_WORKERS ?= 2

.PHONY: demo test venv clean

$(PY): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m model.attention.shared_scores_cpu
	touch $(PY)

venv: $(PY)

demo: $(PY)
	PY=$(PY) bash scripts/demo.sh

test: $(PY)
	$(PY) -m pytest -q -n $(TEST_WORKERS) tests

clean:
	rm -rf $(VENV) output/demo
