# The two commands: `make run` trains the default job, `make test` runs the test suite.
# Both create .venv on first use. torch is installed first and explicitly: the CPU build on a
# machine without CUDA, the machine's own (CUDA) torch where there is one.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_CPU := torch==2.13.0
EXTRAS ?= dev,hf
TEST_WORKERS ?= 2

.PHONY: setup run test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@if $(PYTHON) -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then \
		echo "CUDA torch found on this machine: using it"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV) && $(BIN)/python -m pip install -q $(TORCH_CPU); \
	fi
	$(BIN)/python -m pip install -q -e '.[$(EXTRAS)]'
	@touch $(STAMP)

run: setup
	$(BIN)/orchestrator train $(ARGS)

# The tests on TEST_WORKERS processes, a file at a time, in tests/conftest.py's order (longest first).
test: setup
	$(BIN)/ruff check orchestrator tests bench
	$(BIN)/ruff format --check orchestrator tests bench
	$(BIN)/mypy
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache .mypy_cache
