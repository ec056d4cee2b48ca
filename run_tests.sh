#!/usr/bin/env bash
# Sets up .venv (with test extras and the Debian packages the tests use), then runs the whole suite.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")" && pwd)"
bash "$ROOT/scripts/setup_env.sh" test
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
