#!/usr/bin/env bash
# Build the coding-gym server image (coding-env:latest) with a Docker engine that may reach no
# package index from inside a build.
#
# Usage:
#   scripts/build-image.sh            build, or reuse the image when nothing changed
#   scripts/build-image.sh --force    rebuild the wheels and the image
#
# Steps, each skipped when its inputs have not changed:
#   1. The base image: $BASE_IMAGE, or what `scripts/docker-engine.sh --print-base` provides
#      (python:3.11-slim when it can be pulled, a local Debian image otherwise).
#   2. Wheels of every dependency, built by the host's pip into build/wheels/ (the host's pip
#      knows this machine's proxies and certificates; a build inside Docker does not). The
#      Dockerfile installs from there with --no-index when the folder holds wheels.
#   3. `docker build`, labelled with a hash of its inputs: an image whose label matches is
#      up to date and is kept as is. Docker's layer cache covers partial changes.
#
# The last line on stdout is `IMAGE=<name>`.
#
# Settings (environment variables, all optional):
#   CODING_GYM_IMAGE   image to build                          (coding-env:latest)
#   BASE_IMAGE         base image                              (from docker-engine.sh)
#   PYTHON             host Python that builds the wheels      (python3)
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE="${CODING_GYM_IMAGE:-coding-env:latest}"
PYTHON="${PYTHON:-python3}"
WHEELS=build/wheels
HASH_LABEL=coding-gym.build-hash

FORCE=0
case "${1:-}" in
  "") ;;
  --force) FORCE=1 ;;
  -h | --help)
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
    ;;
  *)
    echo "build-image: unknown argument: $1 (try --help)" >&2
    exit 2
    ;;
esac

log() { echo "build-image: $*" >&2; }
die() {
  echo "build-image: error: $*" >&2
  exit 1
}

if [[ -z ${BASE_IMAGE:-} ]]; then
  BASE_IMAGE=$(scripts/docker-engine.sh --print-base | tail -n 1)
  BASE_IMAGE=${BASE_IMAGE#BASE_IMAGE=}
fi
[[ -n $BASE_IMAGE ]] || die "no base image (set BASE_IMAGE or fix scripts/docker-engine.sh)"
docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 || docker pull -q "$BASE_IMAGE" >/dev/null ||
  die "base image $BASE_IMAGE is not present and cannot be pulled"

# Wheels are specific to a Python version: build them with the one the image runs.
PY_VERSION='import sys; print("%d.%d" % sys.version_info[:2])'
image_python=$(docker run --rm --network none --entrypoint python3 "$BASE_IMAGE" -c "$PY_VERSION")
host_python=$("$PYTHON" -c "$PY_VERSION")
if [[ $image_python != "$host_python" ]]; then
  die "$BASE_IMAGE runs Python $image_python but $PYTHON is $host_python;" \
    "set PYTHON to a Python $image_python interpreter"
fi

# ----------------------------------------------------------------- wheels ----
wheels_key=$(
  {
    cat pyproject.toml
    echo "python=$host_python platform=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_platform())')"
  } | sha256sum | cut -d' ' -f1
)
if ((!FORCE)) && [[ -f $WHEELS/.key && $(<"$WHEELS/.key") == "$wheels_key" ]]; then
  log "wheels in $WHEELS are up to date"
else
  log "building wheels into $WHEELS"
  rm -rf "$WHEELS"
  mkdir -p "$WHEELS"
  # The project's dependencies with the server extra, and the build backend the image uses
  # to build the project's own wheel.
  pip_log=$(mktemp)
  if ! "$PYTHON" -m pip wheel --wheel-dir "$WHEELS" ".[server]" "setuptools>=68" wheel \
    >"$pip_log" 2>&1; then
    tail -n 40 "$pip_log" >&2
    rm -f "$pip_log"
    die "pip wheel failed"
  fi
  rm -f "$pip_log"
  # The project's wheel is rebuilt from source inside the image; drop this one.
  rm -f "$WHEELS"/coding_gym-*.whl
  echo "$wheels_key" >"$WHEELS/.key"
  log "$(find "$WHEELS" -name '*.whl' | wc -l) wheels ready"
fi

# ------------------------------------------------------------------ image ----
# Everything the build reads (see .dockerignore), plus the base image it starts from.
build_hash=$(
  {
    docker image inspect --format '{{.Id}}' "$BASE_IMAGE"
    find Dockerfile .dockerignore pyproject.toml README.md coding_gym "$WHEELS" -type f \
      ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum
  } | sha256sum | cut -d' ' -f1
)
current=$(docker image inspect --format "{{index .Config.Labels \"$HASH_LABEL\"}}" "$IMAGE" 2>/dev/null || true)
if ((!FORCE)) && [[ $current == "$build_hash" ]]; then
  log "$IMAGE is up to date"
else
  log "building $IMAGE on $BASE_IMAGE"
  # The build stage gets a tag of its own: without one, every change leaves its last layer
  # behind as an untagged image, and removing those by hand would take the dependency layer
  # (the slow one) with them.
  if [[ ${IMAGE##*/} == *:* ]]; then
    build_stage="${IMAGE%:*}-build-stage:${IMAGE##*:}"
  else
    build_stage="$IMAGE-build-stage"
  fi
  build_log=$(mktemp)
  for target in "$build_stage" "$IMAGE"; do
    previous=$(docker image inspect --format '{{.Id}}' "$target" 2>/dev/null || true)
    if [[ $target == "$build_stage" ]]; then
      target_args=(--target build)
    else
      target_args=(--label "$HASH_LABEL=$build_hash")
    fi
    if ! docker build "${target_args[@]}" --build-arg "BASE_IMAGE=$BASE_IMAGE" \
      --tag "$target" . >"$build_log" 2>&1; then
      tail -n 60 "$build_log" >&2
      rm -f "$build_log"
      die "docker build failed"
    fi
    # What this build replaced; removal fails harmlessly while a container still uses it.
    if [[ -n $previous && $previous != $(docker image inspect --format '{{.Id}}' "$target") ]]; then
      docker image rm "$previous" >/dev/null 2>&1 || true
    fi
  done
  rm -f "$build_log"
  log "built $IMAGE ($(docker image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
fi

echo "IMAGE=$IMAGE"
