#!/usr/bin/env bash
# Sets up .venv if needed, then serves the built-in avatar. Extra arguments go to `live-avatar serve`.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")" && pwd)"
bash "$ROOT/scripts/setup_env.sh"
exec "$ROOT/.venv/bin/live-avatar" serve --config "$ROOT/configs/tiny.yaml" "$@"
