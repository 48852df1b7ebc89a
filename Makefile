# Two entry points, both from nothing on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DATA ?= ../shared/data
# torch first, pinned: pip then keeps it rather than resolving a (CUDA) build of its own choice.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test test-fast style quality bench-kernels clean

$(VENV)/.installed: pyproject.toml CMakeLists.txt $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	HF_HUB_OFFLINE=1 $(PY) examples/demo.py --data-dir $(DATA)/glue/SST-2 --output-dir outputs/demo

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests -q

test-fast: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests -q -m "not slow and not distributed"

style: setup
	$(VENV)/bin/ruff format src tests examples benchmarks
	$(VENV)/bin/ruff check --fix src tests examples benchmarks

quality: setup
	$(VENV)/bin/ruff check src tests examples benchmarks
	$(VENV)/bin/ruff format --check src tests examples benchmarks

clean:
	rm -rf build outputs $(VENV)
