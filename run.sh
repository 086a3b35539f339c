#!/usr/bin/env bash
# Installs everything the app needs, then starts it; flags go to launch.py (see `./run.sh --help`).
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh
exec .venv/bin/python launch.py "$@"
