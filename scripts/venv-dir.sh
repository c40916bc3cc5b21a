#!/usr/bin/env bash
# The virtual environment the tests and the demo run in, relative to the repository root: .venv for
# the project's own ComfyUI, one per checkout for COMFYUI_PATH (each ComfyUI has its requirements).
set -euo pipefail
if [ -z "${COMFYUI_PATH:-}" ]; then
  echo .venv
else
  abs=$(cd "$COMFYUI_PATH" 2>/dev/null && pwd -P || echo "$COMFYUI_PATH")
  name=$(basename "$abs" | sed 's/[^A-Za-z0-9._-]/_/g')
  echo ".venv-hosts/$name-$(printf '%s' "$abs" | sha1sum | cut -c1-8)"
fi
