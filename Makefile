# Quick start:  make demo   (the embedded default model answers about an example image)
#               make test   (the test suite)
VENV ?= .venv
PY := $(VENV)/bin/python

$(PY):
	VENV=$(VENV) bash scripts/setup-venv.sh

.PHONY: setup demo test bench
setup:
	VENV=$(VENV) bash scripts/setup-venv.sh

demo: $(PY)
	$(VENV)/bin/step3-edge generate --image step3_edge/assets/examples/shapes.png "What is in this picture?"

test: $(PY)
	$(PY) -m pytest -rs

bench: $(PY)
	$(PY) bench/bench_core.py
