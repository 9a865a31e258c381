#!/usr/bin/env bash
# Set up everything the test suite needs from scratch, then run lint, types and the tests.
#   scripts/test.sh [pytest args...]
# Idempotent: reuses .venv, installed system packages, the Docker engine and the image. In CI
# (CI=true) tests that need Docker or a browser are required: they fail, rather than skip, when
# the service is missing (CODING_GYM_REQUIRE_DOCKER=1 asks the same of Docker elsewhere).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[test.sh] %s\n' "$*"; }

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    log "creating .venv with $($python --version)"
    "$python" -m venv .venv
fi
# torch (for stable-baselines3) pinned first: this CPU build is a few hundred MB, where an
# unpinned resolve picks a CUDA build of several GB.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    log "installing torch (CPU build)"
    .venv/bin/pip install -q "torch==2.13.0" 2>&1 | { grep -v "^WARNING: Location" || true; }
fi
log "installing coding-gym with its extras"
.venv/bin/pip install -q -e ".[server,docker,sb3,dev,interop,browser,bench]" 2>&1 \
    | { grep -v "^WARNING: Location" || true; }

log "ruff"
.venv/bin/ruff check --output-format concise coding_gym tests benchmarks examples
log "mypy"
.venv/bin/mypy coding_gym

# The Docker engine and the server image (both reused when they exist). Where Docker tests
# are required a failure here ends the run; elsewhere those tests skip and say how to run them.
log "Docker engine and server image"
if [ "${CI:-}" = true ] || [ "${CODING_GYM_REQUIRE_DOCKER:-}" = 1 ]; then
    bash scripts/docker-engine.sh
    PYTHON=.venv/bin/python bash scripts/build-image.sh
elif ! { bash scripts/docker-engine.sh && PYTHON=.venv/bin/python bash scripts/build-image.sh; }; then
    log "no Docker engine or image: Docker tests will skip"
fi

# Debian's chromium for the browser tests (Playwright drives it; no browser download).
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        log "installing chromium"
        apt-get update -qq && apt-get install -y -qq chromium
    else
        log "no chromium, and not root to install it: browser tests will skip outside CI"
    fi
fi

log "pytest"
set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
# pytest exits 5 when it collected nothing: that is a failure here.
exit $status
