#!/usr/bin/env bash
# Create/refresh the project's virtual environment (.venv): torch 2.13.0 (CPU), the pack's
# requirements, EVERY optional extra (so that every test runs) and the test requirements
# (requirements-test.txt names them all), then the sam2 source build. Idempotent and fast when nothing
# changed (stamp file).
#   bash scripts/setup_env.sh            # pack + tests
#   bash scripts/setup_env.sh --force    # reinstall even if the stamp matches
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

FORCE=0
for a in "$@"; do
    case "$a" in
        --force) FORCE=1 ;;
        -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
        *) die "unknown option $a" ;;
    esac
done

PYTHON_BIN="${PYTHON:-python3}"
if [ ! -x "$PY" ]; then
    command -v "$PYTHON_BIN" >/dev/null || die "$PYTHON_BIN not found; install Python >= 3.10"
    "$PYTHON_BIN" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
        || die "Python >= 3.10 needed ($PYTHON_BIN is $("$PYTHON_BIN" -V 2>&1))"
    log "creating $VENV"
    "$PYTHON_BIN" -m venv "$VENV"
fi

STAMP="$VENV/.dreamidv-setup.stamp"
WANT="$(hash_of "$ROOT/constraints.txt" "$ROOT"/requirements*.txt \
                "$ROOT/scripts/setup_env.sh")-$("$PY" -c 'import sys; print(sys.version.split()[0])')"
if [ "$FORCE" = 0 ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
    log "environment up to date ($VENV)"
    exit 0
fi

TORCH_VERSION="$(sed -n 's/^torch==\([^ ]*\).*/\1/p' "$ROOT/constraints.txt")"
log "installing torch==$TORCH_VERSION, the requirements and every optional extra into $VENV"
"$PY" -m pip install --quiet "torch==$TORCH_VERSION"
"$PY" -m pip install --quiet -r "$ROOT/requirements-test.txt"

# SAM 2 (the background composite) is published as source only and its dependencies name torch and
# torchvision: build it against the torch already here, without its CUDA extension and without
# dependencies (hydra-core and iopath come from requirements-sam2.txt). Skipped when already installed.
SAM2_VERSION=1.1.0
if ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('sam2') != '$SAM2_VERSION')" 2>/dev/null; then
    log "installing sam2==$SAM2_VERSION (source build, no CUDA extension)"
    "$PY" -c 'import setuptools, wheel' 2>/dev/null || "$PY" -m pip install --quiet setuptools wheel
    SAM2_BUILD_CUDA=0 "$PY" -m pip install --quiet --no-deps --no-build-isolation "sam2==$SAM2_VERSION"
fi

# Check that what is importable is what was asked for (a stray CUDA torch would show up here).
"$PY" - "$TORCH_VERSION" <<'PYEOF'
import sys, torch
want = sys.argv[1]
have = torch.__version__.split("+")[0]
if have != want:
    sys.exit(f"torch {torch.__version__} is installed but {want} is required (see constraints.txt)")
import numpy, safetensors, PIL, sentencepiece, av, cv2, psutil, pytest, kornia  # noqa: F401  (required)
import onnxruntime, mediapipe.tasks.python.vision, sam2.sam2_video_predictor, onnx, insightface  # noqa: F401  (extras, tests)
print(f"[dreamidv] torch {torch.__version__}, numpy {numpy.__version__}, pytest {pytest.__version__}: ok",
      file=sys.stderr)
PYEOF

echo "$WANT" > "$STAMP"
log "environment ready ($VENV)"
