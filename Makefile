# The README's two commands: `make demo` (the main job) and `make test`. Each sets up what it needs.
VENV ?= .venv
PYTHON ?= python3
# On a CPU-only machine this takes the local CPU wheel; with a GPU, set TORCH_SPEC to your CUDA build (or "torch").
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: demo test bench install kvpress clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) examples/demo.py

# the optional kvpress baseline lives in its own environment (kvpress pins transformers < 5.3)
kvpress:
	bash examples/setup_kvpress.sh

test: $(VENV)/.installed kvpress
	$(PY) -m pytest tests -q -p no:cacheprovider

bench: $(VENV)/.installed kvpress
	$(PY) examples/benchmark.py --out benchmarks

clean:
	rm -rf $(VENV) *.egg-info
