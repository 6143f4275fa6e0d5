# Two commands for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench notebooks clean

LOG := $(VENV)/install.log

# Quiet on success (one line says what is happening); on failure the pip log is printed.
# The CPU wheel of the torch pin lies on local disk; an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	@echo "Installing memprune and its dependencies into $(VENV) (first run only, about 2 minutes; log: $(LOG))"
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@( $(BIN)/pip install --quiet --upgrade pip && \
	   $(BIN)/pip install --quiet torch==2.13.0 && \
	   $(BIN)/pip install --quiet -e '.[dev,testbed,notebooks]' ) > $(LOG) 2>&1 \
	   || { cat $(LOG); echo "Installation failed: the pip log is above and in $(LOG)."; exit 1; }
	@touch $(STAMP)

install: $(STAMP)

# Lint and type-check first (seconds), then the suite (minutes); configuration in pyproject.toml.
test: $(STAMP)
	$(BIN)/ruff check memprune tests bench scripts
	$(BIN)/mypy memprune
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	bash scripts/demo.sh

notebooks: $(STAMP)
	$(BIN)/python scripts/run_notebooks.py

bench: $(STAMP)
	$(BIN)/python bench/record_overhead.py
	$(BIN)/python bench/locate_throughput.py --processes 1 2
	$(BIN)/python bench/prune_save_time.py

clean:
	rm -rf $(VENV) runs
