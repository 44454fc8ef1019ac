#!/usr/bin/env bash
# `make test`: build the environment if needed, run every test, print the total wall time.
# Exits non-zero if the build fails, a test fails, or pytest collects nothing (exit 5).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/setup_env.sh
env_done=$(date +%s)
# Lint (real mistakes) and formatting, in a second: a failure here stops before the long tests.
LINT_PATHS=(nemo_igrpo tests bench launch scripts examples containers)
.venv/bin/ruff check "${LINT_PATHS[@]}"
.venv/bin/ruff format --check --quiet "${LINT_PATHS[@]}" || {
  echo "[make test] ruff format would change the files above: run .venv/bin/ruff format ${LINT_PATHS[*]}" >&2; exit 1; }
set +e
.venv/bin/python -m pytest -p no:cacheprovider --durations=15 "$@"
rc=$?
set -e
end=$(date +%s)
echo "[make test] environment: $((env_done - start)) s, tests: $((end - env_done)) s, total: $((end - start)) s (pytest exit $rc)"
exit $rc
