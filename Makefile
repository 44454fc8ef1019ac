# The README's two commands: `make demo` and `make test`. Both build .venv first (idempotent).
SHELL := /bin/bash
PY := .venv/bin/python

.PHONY: env demo test test-unit test-distributed test-e2e bench bench-actor bench-generation bench-scaling bench-all clean-env

env:
	@bash scripts/setup_env.sh

demo: env
	@$(PY) -m nemo_igrpo demo

test:
	@bash scripts/run_tests.sh

test-unit: env
	$(PY) -m pytest -m unit

test-distributed: env
	$(PY) -m pytest -m distributed

test-e2e: env
	$(PY) -m pytest -m e2e

bench: env
	$(PY) bench/igrpo_vs_grpo.py

bench-actor: env
	$(PY) bench/actor_vs_hf.py

bench-generation: env
	$(PY) bench/generation.py

bench-scaling: env
	$(PY) bench/scaling.py

bench-all: bench bench-actor bench-generation bench-scaling

clean-env:
	rm -rf .venv
