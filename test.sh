#!/usr/bin/env bash
# Installs everything the tests need, then runs the whole suite; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh test
exec .venv/bin/python -m pytest "$@"
