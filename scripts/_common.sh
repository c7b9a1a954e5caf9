# Shared by the scripts in this folder (sourced, not run). Sets ROOT, VENV, PY and the pip guard rails.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DREAMIDV_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
CACHE="${DREAMIDV_CACHE:-$ROOT/.cache}"
# Every pip call is held to torch==2.13.0 (CPU build): anything wanting another torch fails instead
# of downloading a multi-GB CUDA build. See constraints.txt.
export PIP_CONSTRAINT="$ROOT/constraints.txt"
export PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_NO_INPUT=1

log() { printf '[dreamidv] %s\n' "$*" >&2; }
die() { printf '[dreamidv] error: %s\n' "$*" >&2; exit 1; }

# hash_of FILE... -> one sha256 over the files' contents (missing files count as empty)
hash_of() {
    local f
    for f in "$@"; do printf '%s\n' "$f"; cat "$f" 2>/dev/null || true; done | sha256sum | cut -d' ' -f1
}
