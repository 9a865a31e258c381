#!/usr/bin/env bash
# Set up everything the test suite needs from scratch, then run lint, types and the tests.
#   scripts/test.sh [pytest args...]
# Idempotent: reuses .venv and installed system packages. In CI (CI=true) tests that need
# Docker or a browser are required: they fail, rather than skip, when the service is missing.
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
.venv/bin/pip install -q -e ".[server,docker,sb3,dev,interop,browser]" 2>&1 \
    | { grep -v "^WARNING: Location" || true; }

log "ruff"
.venv/bin/ruff check --output-format concise coding_gym tests benchmarks examples
log "mypy"
.venv/bin/mypy coding_gym

log "pytest"
set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
# pytest exits 5 when it collected nothing: that is a failure here.
exit $status
