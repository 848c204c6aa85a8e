# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY := .venv/bin/python
STAMP := .venv/.installed
LORAFLEET := .venv/bin/lorafleet
PYTEST_ARGS ?=

.PHONY: install models lint format test test-fast demo clean

install: $(STAMP)

# Re-runs only when what the install depends on changed: seconds otherwise.
$(STAMP): scripts/install.sh scripts/install_prometheus.sh pyproject.toml constraints-cpu.txt constraints-gpu.txt
	@start=$$(date +%s); scripts/install.sh && scripts/install_prometheus.sh && touch $(STAMP) && echo "==> install took $$(( $$(date +%s) - start )) s"

models: install
	$(LORAFLEET) models pull

# ruff for style; import-linter for the layers (contracts in pyproject.toml: which package may import which).
lint: install
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/lint-imports

format: install
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

test: install models lint
	$(PY) -m pytest -v -ra --durations=15 $(PYTEST_ARGS)

# Everything but the tests that start vLLM.
test-fast: install models lint
	$(PY) -m pytest -ra -m "not vllm" $(PYTEST_ARGS)

demo: install models
	$(LORAFLEET) demo $(if $(QUICK),--quick,) $(DEMO_ARGS)

clean:
	rm -rf runs/ .pytest_cache .ruff_cache
