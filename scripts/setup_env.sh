#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install dgucdir into it.
#
# The full stack (torch + DALI + mlflow) is ~7 GB and takes minutes to install, so the
# environment lives outside the clone, keyed by a hash of the dependency lists in
# pyproject.toml, the exact versions in constraints.txt and the Python version: repeated runs and CI reuse it as long as the
# dependency set did not change. The project itself is installed editable (no reinstall on
# code changes); it is re-pointed at this clone when the environment came from another one.
#
# Prints the path of the environment's python as its only line on stdout.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
key="$(python3 - "$root/pyproject.toml" "$root/constraints.txt" <<'PY'
import hashlib, json, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
inputs = [project["dependencies"], project.get("optional-dependencies", {}), open(sys.argv[2]).read(), sys.version]
print(hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16])
PY
)"
cache="${DGUCDIR_VENV_CACHE:-$HOME/.cache/dgucdir/venvs}"
venv="$cache/$key"
log="$cache/$key.log"
if [ ! -f "$venv/.complete" ]; then
    echo "setup: creating $venv (first time for these dependencies; takes a few minutes)" >&2
    rm -rf "$venv"
    mkdir -p "$cache"
    python3 -m venv "$venv"
    if ! { "$venv/bin/pip" install --upgrade pip && "$venv/bin/pip" install -c "$root/constraints.txt" -e "$root[test,cu13,mlflow,report]"; } >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        echo "setup: install failed; full log in $log" >&2
        exit 1
    fi
    touch "$venv/.complete"
else
    echo "setup: reusing $venv" >&2
fi
here="$(cd / && "$venv/bin/python" -c 'import dgucdir, pathlib; print(pathlib.Path(dgucdir.__file__).resolve().parents[1])' 2>/dev/null || true)"
if [ "$here" != "$root" ]; then
    echo "setup: pointing the environment at $root" >&2
    "$venv/bin/pip" install --no-deps -e "$root" >>"$log" 2>&1
fi
echo "$venv/bin/python"
