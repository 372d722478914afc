#!/usr/bin/env bash
# The one setup path: .venv with the index's default torch + torchvision, this pack (editable) with its
# dev tools and the eval extra, and -- when a ComfyUI checkout is found -- ComfyUI's own requirements plus `requests`.
# Idempotent: does nothing when pyproject.toml and the ComfyUI requirements are unchanged since the last run.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV=.venv
COMFYUI="$("$PYTHON" headless.py find-comfyui || true)"
REQS="${COMFYUI:+$COMFYUI/requirements.txt}"

key="$( { cat pyproject.toml scripts/setup.sh; echo "$COMFYUI"; [ -n "$REQS" ] && cat "$REQS"; } | sha256sum | cut -d' ' -f1)"
if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.setup-key" 2>/dev/null)" = "$key" ]; then
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }

# torch + torchvision from the index's defaults (CUDA builds; they run on CPU). ComfyUI imports torchvision.
pip install torch torchvision
pip install -e ".[dev,eval,train]"  # eval: identity scoring + benchmark CLI; train: the trainers' extras
if [ -n "$COMFYUI" ]; then
  echo "setup: ComfyUI found at $COMFYUI; installing its requirements"
  # torch/torchvision are installed above; torchaudio is optional (audio nodes only)
  grep -v -x -E '(torch|torchvision|torchaudio)' "$REQS" > "$VENV/comfyui-requirements.txt"
  pip install -r "$VENV/comfyui-requirements.txt" requests  # requests: imported by ComfyUI, not listed
else
  echo "setup: ComfyUI not found (set COMFYUI_PATH); the ComfyUI test tier will be skipped"
fi
# browser test tier: the `playwright` package (a dev extra) drives the system's Chromium, never a downloaded one
if command -v chromium >/dev/null || command -v chromium-browser >/dev/null || [ -n "${CHROMIUM_PATH:-}" ]; then
  :
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "setup: installing Chromium with apt for the browser tests"
  apt-get install -y chromium || { apt-get update && apt-get install -y chromium; }
else
  echo "setup: Chromium not found, so the browser test tier will be skipped. Install it as root" \
    "(Debian/Ubuntu: sudo apt-get install chromium) or point CHROMIUM_PATH at a Chromium binary"
fi
echo "$key" > "$VENV/.setup-key"
