# blockxfer: `make demo` runs the main job end to end; `make test` runs the test suite.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: demo test lint typecheck bench testbed clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,scsi]' || $(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q atheris || echo "atheris did not install: its fuzz test will skip"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/blockxfer demo

test: $(STAMP)
	bash scripts/apt-deps.sh
	$(BIN)/ruff check blockxfer drivers tests bench
	$(BIN)/mypy blockxfer drivers
	$(BIN)/pytest -q -m "not slow and not vm"

lint: $(STAMP)
	$(BIN)/ruff check blockxfer drivers tests bench

typecheck: $(STAMP)
	$(BIN)/mypy blockxfer drivers

bench: $(STAMP)
	$(BIN)/python -m bench

testbed: $(STAMP)
	bash vm-testbed/run.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

# vm-testbed extras (docs/testbed.md): a shell in the guest, the throttled RAID0 benchmark
.PHONY: testbed-shell testbed-bench
testbed-shell: $(STAMP)
	bash vm-testbed/run.sh --shell

testbed-bench: $(STAMP)
	bash vm-testbed/run.sh --bench
