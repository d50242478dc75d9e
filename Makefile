# blockxfer: `make demo` runs the main job end to end; `make test` runs the test suite.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: demo test test-slow lint typecheck bench testbed clean venv extras install-extras

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,scsi]' || $(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q atheris || echo "atheris did not install: its fuzz test will skip"
	touch $(STAMP)

# the man page and bash/zsh completion, generated from the parser (blockxfer/cli/docgen.py);
# setup.py installs whatever is under share/ as data files of the package
SHARE   := share
PREFIX  ?= /usr/local
extras: $(STAMP)
	mkdir -p $(SHARE)/man/man1 $(SHARE)/bash-completion/completions $(SHARE)/zsh/site-functions
	$(BIN)/blockxfer man > $(SHARE)/man/man1/blockxfer.1
	$(BIN)/blockxfer completion bash > $(SHARE)/bash-completion/completions/blockxfer
	$(BIN)/blockxfer completion zsh > $(SHARE)/zsh/site-functions/_blockxfer

install-extras: extras
	cp -r $(SHARE)/. $(PREFIX)/share/

demo: $(STAMP)
	$(BIN)/blockxfer demo

test: $(STAMP)
	bash scripts/apt-deps.sh
	$(BIN)/ruff check blockxfer drivers tests bench
	$(BIN)/mypy blockxfer drivers bench tests
	bash scripts/pytest.sh -m "not slow and not vm"

# the long suites (many kill points, real clusters, terminals): CI runs them after `make test`
test-slow: $(STAMP)
	bash scripts/apt-deps.sh
	bash scripts/pytest.sh -m "slow and not vm"

lint: $(STAMP)
	$(BIN)/ruff check blockxfer drivers tests bench

typecheck: $(STAMP)
	$(BIN)/mypy blockxfer drivers bench tests

bench: $(STAMP)
	bash scripts/apt-deps.sh tests/apt-packages.txt bench/apt-packages.txt
	$(BIN)/python -m bench

testbed: $(STAMP)
	bash vm-testbed/run.sh

clean:
	rm -rf $(VENV) build $(SHARE) *.egg-info .pytest_cache .mypy_cache .ruff_cache

# vm-testbed extras (docs/testbed.md): a shell in the guest, the throttled RAID0 benchmark
.PHONY: testbed-shell testbed-bench
testbed-shell: $(STAMP)
	bash vm-testbed/run.sh --shell

testbed-bench: $(STAMP)
	bash vm-testbed/run.sh --bench

# the same device suite in a Vagrant (vagrant-libvirt) VM from a locally built box (docs/testbed.md)
.PHONY: testbed-vagrant
testbed-vagrant: $(STAMP)
	bash vm-testbed/vagrant/run.sh
