#!/usr/bin/env bash
# Rewrites constraints.txt with the exact versions of the environment scripts/setup_env.sh built
# (after a change of the ranges in pyproject.toml: install without -c, run the tests, then lock).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$(bash "$root/scripts/setup_env.sh")"
{
    sed -n '1,/^# the package itself/p' "$root/constraints.txt" | grep '^#'
    "$py" -m pip freeze --exclude-editable | grep -v '^dgucdir=='
} > "$root/constraints.txt.new"
mv "$root/constraints.txt.new" "$root/constraints.txt"
echo "constraints.txt: $(grep -vc '^#' "$root/constraints.txt") packages"
"$py" "$root/scripts/node_constraints.py"
