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

# The GPU test machine (one GPU, no network, its own torch): bench/RESULTS.md, "gpu-check".
# gpu-wheels runs here (PyPI access) and fills .gpu-wheels; the others run there, with that
# machine's python (GPU_PYTHON), not .venv.
GPU_PYTHON ?= python3
.PHONY: gpu-wheels gpu-check gpu-check-setup gpu-check-plan

gpu-wheels: env
	$(PY) scripts/prepare_gpu_wheels.py

gpu-check:
	$(GPU_PYTHON) bench/gpu_check.py $(GPU_CHECK_ARGS)

gpu-check-setup:
	$(GPU_PYTHON) bench/gpu_check.py --setup-only

gpu-check-plan:
	$(GPU_PYTHON) bench/gpu_check.py --dry-run
