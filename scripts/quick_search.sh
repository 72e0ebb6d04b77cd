#!/usr/bin/env bash
# Set up everything on a fresh machine and run the main job: a short FBNet search on the
# built-in data set, with a latency table measured on the spot for this CPU.
set -euo pipefail
source "$(dirname "$0")/setup.sh"
"$VENV/bin/fbnet-fast" search --out "${1:-runs/quick}" --preset quick
