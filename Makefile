# make demo: train APART, PGD-10 and FGSM-RS on the bundled digits data (CPU, a few minutes).
# make test: the main test suite in .venv, without the tests marked slow (AutoAttack, sanity checks, compiling every
# kernel for sm_90). make test-all (what CI runs, .ci/run): that, the slow tests (test-slow), then the GPU image's
# rehearsal (test-gpuimage: a second venv, 0.7 GB downloaded on first use).
# All create .venv and install everything on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CUDA_HOME ?= $(wildcard /usr/local/cuda)
export CUDA_HOME

.PHONY: install demo test test-main test-slow test-all test-gpuimage lint clean

install: $(STAMP)

$(STAMP): setup.py requirements.txt $(wildcard csrc/*)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m apart_fast demo

test: test-main

test-all: test-main test-slow test-gpuimage

test-main: $(STAMP)
	$(PY) -m pytest -q --durations=10 -m "not slow and not gpuimage" tests

# a few long tests (AutoAttack, sanity checks, the sm_90 compile): spread over the cores, longest waits shortest
test-slow: $(STAMP)
	$(PY) -m pytest -q --durations=10 -n $$(nproc) --dist worksteal -m "slow and not gpuimage" tests

# The GPU image's torch, triton and torchvision (requirements-gpuimage.txt) in a second venv that reads every
# other package from .venv (a .pth line); on a copy of the work tree whose C++ extension is built against that
# torch: every Triton kernel specialisation and the CUDA extension compiled for sm_90 (benchmarks/sm90_report.py,
# exit 1 on a compile error), the Triton tests under the interpreter and the GPU suite's CPU dry run (gpu_suite.sh).
GPUIMG := .venv-gpuimage
GPUIMG_STAMP := $(GPUIMG)/.installed

$(GPUIMG_STAMP): $(STAMP) requirements-gpuimage.txt
	rm -rf $(GPUIMG)
	python3 -m venv --without-pip $(GPUIMG)  # pip and setuptools come from .venv too
	$(PY) -c "import site; print(site.getsitepackages()[0])" > \
		"$$($(GPUIMG)/bin/python -c 'import site; print(site.getsitepackages()[0])')/main-venv.pth"
	$(GPUIMG)/bin/python -m pip install -q --no-deps -r requirements-gpuimage.txt
	touch $@

test-gpuimage: $(GPUIMG_STAMP)
	rm -rf $(GPUIMG)/src $(GPUIMG)/sm90 $(GPUIMG)/sm90.log && mkdir -p $(GPUIMG)/src
	git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -xf - -C $(GPUIMG)/src
	cd $(GPUIMG)/src && APART_FAST_NO_CUDA=1 ../bin/python -m pip install -q --no-build-isolation --no-deps -e .
	cd $(GPUIMG)/src && ../bin/python -c "import torch, triton; assert (torch.__version__.split('+')[0], triton.__version__) \
		== ('2.11.0', '3.6.0'), (torch.__version__, triton.__version__)"
	cd $(GPUIMG)/src && ../bin/python benchmarks/sm90_report.py --jobs $$(nproc) --out ../sm90 > ../sm90.log \
		|| { grep -E "^#|ERROR" ../sm90.log; exit 1; }
	cd $(GPUIMG)/src && ../bin/python -m pytest -q -p no:cacheprovider tests/bench/test_gpu_suite.py tests/ops/test_triton.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf build *.egg-info apart_fast/*.so $(GPUIMG)
