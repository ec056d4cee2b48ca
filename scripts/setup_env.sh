#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project into it. Sourced by run_live.sh and run_tests.sh.
# Usage: scripts/setup_env.sh [test]   -- "test" also installs test extras and the Debian packages tests use.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
WANT_TEST="${1:-}"
PY="${PYTHON:-python3}"
# The CPU build keeps CI fast; on GPU hosts set TORCH_SPEC to a CUDA build (any torch >= 2.4 works).
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
  echo "error: Python >= 3.11 is required (found $("$PY" --version 2>&1))" >&2
  exit 1
fi

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
VPY="$ROOT/.venv/bin/python"
STAMP=".venv/.installed-$(cat pyproject.toml | sha1sum | cut -c1-12)${WANT_TEST:+-test}"
if [ ! -f "$STAMP" ]; then
  echo "[setup] installing python packages (first run only)"
  "$VPY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  "$VPY" -c 'import torch' 2>/dev/null || "$VPY" -m pip install -q "$TORCH_SPEC"
  if [ "$WANT_TEST" = "test" ]; then
    "$VPY" -m pip install -q -e ".[test,dev]"
  else
    "$VPY" -m pip install -q -e .
  fi
  touch "$STAMP"
fi

if [ "$WANT_TEST" = "test" ]; then
  need=()
  command -v chromium >/dev/null 2>&1 || need+=(chromium)
  command -v nginx >/dev/null 2>&1 || need+=(nginx)
  [ -e /usr/lib/nginx/modules/ngx_rtmp_module.so ] || need+=(libnginx-mod-rtmp)
  command -v espeak-ng >/dev/null 2>&1 || need+=(espeak-ng)
  command -v sox >/dev/null 2>&1 || need+=(sox)
  # coturn's turnserver: tests/signaling/test_turn.py starts it in the foreground (its system service stays off).
  command -v turnserver >/dev/null 2>&1 || need+=(coturn)
  # GStreamer's webrtcbin as a third-party WebRTC peer (tests/gst_peer.py runs on Debian's /usr/bin/python3).
  /usr/bin/python3 tests/gst_peer.py --check >/dev/null 2>&1 || need+=(python3-gst-1.0 gir1.2-gst-plugins-bad-1.0 \
    gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad gstreamer1.0-nice gstreamer1.0-libav)
  if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
      echo "[setup] apt-get install ${need[*]}"
      apt-get update -q >/dev/null
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
    else
      echo "[setup] warning: missing ${need[*]}; tests that need them will be skipped (run as root to install)" >&2
    fi
  fi
fi
