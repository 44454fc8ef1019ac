#!/usr/bin/env bash
# Create (or reuse) the project's Python 3.12 environment in .venv.
#
# Idempotent: the environment is stamped with a hash of everything that defines it; a second
# run with nothing changed installs nothing. A stale or broken .venv is rebuilt from scratch.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
# The code_tests reward runs solutions in a bubblewrap sandbox and refuses to run without it.
# Checked on every run (a machine may have .venv but not bwrap); costs nothing when present.
if ! command -v bwrap >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup_env] installing bubblewrap (Debian package) for the code_tests sandbox"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends bubblewrap >/dev/null
  else
    echo "[setup_env] warning: bwrap (bubblewrap) is missing and this is not root with apt-get;" \
         "install it to use the code_tests reward (its tests will fail without it)" >&2
  fi
fi
STAMP="$VENV/.nemo-igrpo-env"
want=$(cat requirements/cpu.txt requirements/nodeps.txt pyproject.toml scripts/setup_env.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c 'import nemo_igrpo' 2>/dev/null; then
  exit 0
fi
start=$(date +%s)
PY=$(bash scripts/find_python312.sh)
echo "[setup_env] building $VENV with $PY (takes a few minutes on a fresh machine)"
rm -rf "$VENV"
"$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check --no-input)
# This machine's pip config lists local mirrors that may not exist; pip warns once per package
# about them. Keep the log readable; real errors still reach stderr and stop the script.
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
quiet "${PIP[@]}" install -q --progress-bar off --no-deps -r requirements/cpu.txt
quiet "${PIP[@]}" install -q --progress-bar off --no-deps -r requirements/nodeps.txt
quiet "${PIP[@]}" install -q --progress-bar off --no-deps --no-build-isolation -e .
# Fail now, not in the middle of a test run, if the set does not import together.
"$VENV/bin/python" -W ignore - <<'PY'
import importlib
for name in ("torch", "megatron.core", "transformers", "omegaconf", "math_verify", "vllm", "nemo_igrpo"):
    importlib.import_module(name)
PY
echo "$want" > "$STAMP"
echo "[setup_env] done in $(( $(date +%s) - start )) s; $VENV is $(du -sh "$VENV" | cut -f1)"
