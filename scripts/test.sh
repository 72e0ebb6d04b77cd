#!/usr/bin/env bash
# Set up everything on a fresh machine and run the test suite (CI calls this).
set -euo pipefail
source "$(dirname "$0")/setup.sh"
# The venv's pytest script (not "python -m pytest") keeps the source tree off sys.path,
# so "import fbnet_fast" finds the installed package.
"$VENV/bin/pytest" tests "$@"
# The benchmarks run once, untimed, so they cannot rot.
if compgen -G "bench/bench_*.py" > /dev/null; then
    "$VENV/bin/pytest" bench -q --benchmark-disable
fi
