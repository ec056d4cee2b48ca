#!/usr/bin/env bash
# Sets up .venv (with test and dev extras and the Debian packages the tests use), lints, then runs the whole suite.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")" && pwd)"
bash "$ROOT/scripts/setup_env.sh" test
cd "$ROOT"
"$ROOT/.venv/bin/ruff" check .
exec "$ROOT/.venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
