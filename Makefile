# `make test` and `make demo` work on a fresh machine: they create .venv if missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup lint test test-slow demo retrain-tiny clean accel-check

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check qdlm_jax tests benchmarks converters configs experiments

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow --timeout=3600

demo: $(STAMP)
	$(BIN)/python -m qdlm_jax.jobs.demo $(ARGS)

# Retrain both bundled tiny models from scratch (fetches the offline data on first use) and
# rewrite assets/tiny-{llada,dream}. The two runs share one tokenizer and run side by side.
retrain-tiny: $(STAMP)
	$(BIN)/qdlm train --config configs/train_tiny_llada.py --tokenizer-only --config.out_dir=runs
	$(BIN)/qdlm train --config configs/train_tiny_llada.py --config.data.tokenizer=runs/tokenizer.json & \
	$(BIN)/qdlm train --config configs/train_tiny_dream.py --config.data.tokenizer=runs/tokenizer.json & \
	wait
	$(BIN)/qdlm train --config configs/train_tiny_diffusiongemma.py --config.data.tokenizer=runs/tokenizer.json
	$(BIN)/python converters/export_tiny.py runs/train_tiny_llada assets/tiny-llada
	$(BIN)/python converters/export_tiny.py runs/train_tiny_dream assets/tiny-dream
	$(BIN)/python converters/export_tiny.py runs/train_tiny_diffusiongemma assets/tiny-diffusiongemma

# The hardware check (docs/hardware.md). Where $(PY)'s JAX has a GPU or TPU, the project is
# installed beside it (pip --no-deps; only absent dependencies are added; that JAX is never
# reinstalled) and the full check runs; elsewhere the CPU smoke mode runs in .venv.
accel-check:
	@if $(PY) benchmarks/accel_install.py --has-accelerator; then \
		$(PY) benchmarks/accel_install.py && $(PY) benchmarks/accelerator_check.py $(ARGS); \
	else \
		$(MAKE) --no-print-directory setup && \
		$(BIN)/python benchmarks/accelerator_check.py $(ARGS); \
	fi

clean:
	rm -rf $(VENV) runs build *.egg-info
