# make demo: train APART, PGD-10 and FGSM-RS on the bundled digits data (CPU, a few minutes).
# make test: the test suite. Both create .venv and install everything on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CUDA_HOME ?= $(wildcard /usr/local/cuda)
export CUDA_HOME

.PHONY: install demo test lint clean

install: $(STAMP)

$(STAMP): setup.py requirements.txt $(wildcard csrc/*)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m apart_fast demo

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf build *.egg-info apart_fast/*.so
