#!/usr/bin/env bash
# Print the path of a working Python 3.12 interpreter (a pyenv shim may exist but fail).
for cand in "${PYTHON312:-}" python3.12 /usr/bin/python3.12 /usr/local/bin/python3.12 \
            "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
  [ -n "$cand" ] || continue
  if out=$("$cand" -c 'import sys; print(sys.executable) if sys.version_info[:2] == (3, 12) else sys.exit(1)' 2>/dev/null); then
    echo "$out"; exit 0
  fi
done
echo "error: Python 3.12 not found (set PYTHON312=/path/to/python3.12)" >&2
exit 1
