#!/usr/bin/env bash
# The one test command: sets up the environment (and the ComfyUI 0.3.75 used by the `comfyui` tests),
# then runs the whole pytest suite. Extra arguments go to pytest:
#   bash scripts/test.sh                 # everything
#   bash scripts/test.sh -k model_files  # a subset
# Set DREAMIDV_TEST_NO_COMFYUI=1 to skip fetching ComfyUI (its tests then skip with a reason).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

bash "$ROOT/scripts/setup_env.sh"
if [ "${DREAMIDV_TEST_NO_COMFYUI:-0}" != 1 ]; then
    if [ -z "${COMFYUI_DIR:-}" ]; then
        bash "$ROOT/scripts/get_comfyui.sh"
        export COMFYUI_DIR="$CACHE/ComfyUI"
    fi
fi

# The browser test drives Debian's chromium (headless). Installed when missing and we may use apt;
# without it that one test skips with a reason.
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
        && [ "${DREAMIDV_TEST_NO_BROWSER:-0}" != 1 ]; then
    log "installing chromium for the browser test"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }; then
        log "could not install chromium: the browser test will skip"
    fi
fi

cd "$ROOT"
set +e
"$PY" -m pytest "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
    log "pytest collected no tests: treating that as a failure"
    exit 1
fi
exit "$rc"
