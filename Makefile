# Everything a fresh machine needs: `make demo` and `make test` each build .venv first.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
TORCH_SPEC ?= torch==$(TORCH_VERSION)
VENV := .venv
BIN := $(VENV)/bin
# the stamp names the torch spec, so `make test TORCH_SPEC=...` reinstalls when it changes
STAMP := $(VENV)/.installed-$(shell printf '%s' '$(TORCH_SPEC)' | cksum | cut -d' ' -f1)

export MPLBACKEND := Agg
export NO_MKDOCS_2_WARNING := 1

.PHONY: setup demo test lint docs bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	rm -f $(VENV)/.installed-*
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned, so that nothing later pulls a multi-GB CUDA build
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	# the extras under a constraint that pins the torch just installed (no CUDA build, no upgrade),
	# then a check that it is still the same torch
	$(BIN)/python -c 'import torch; print("torch==" + torch.__version__)' > $(VENV)/torch-constraint.txt
	$(BIN)/python -m pip install -q -c $(VENV)/torch-constraint.txt -e ".[dev,lightning,transformers]"
	$(BIN)/python -c 'import sys, torch; want = open(sys.argv[1]).read().strip(); \
		sys.exit(0 if want == "torch==" + torch.__version__ else f"torch changed: {torch.__version__}, want {want}")' \
		$(VENV)/torch-constraint.txt
	touch $(STAMP)

demo: setup
	$(BIN)/initdoctor check examples/xavier_classic.py --fix --fail-on never

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest
	$(BIN)/mkdocs build --strict --quiet --site-dir $(VENV)/site

bench: setup
	$(BIN)/python benchmarks/check_cost.py
	$(BIN)/python benchmarks/watch_overhead.py
	$(BIN)/python benchmarks/compile_watch.py
	$(BIN)/python benchmarks/tensorboard_cost.py
	$(BIN)/python benchmarks/gpu_cost.py

clean:
	rm -rf $(VENV) site .pytest_cache
