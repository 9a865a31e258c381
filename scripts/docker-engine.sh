#!/usr/bin/env bash
# Make a working Docker engine and a Python base image available to the test
# suite, on a Debian host that may have neither a running daemon nor access to
# a container registry.
#
# Usage:
#   scripts/docker-engine.sh               set up (or reuse) everything, one line
#                                          per action, then print BASE_IMAGE=...
#   scripts/docker-engine.sh --print-base  same work, but stdout carries only the
#                                          BASE_IMAGE=... line (actions actually
#                                          taken are reported on stderr)
#
# The last line on stdout is always `BASE_IMAGE=<image>`, the value to pass to
# `docker build --build-arg BASE_IMAGE=<image>`.
#
# What it does, reusing anything that already exists:
#   1. If `docker info` answers, the running engine is used as is.
#   2. Otherwise Debian's docker.io is installed if needed and dockerd is started
#      in the background (overlay2, no iptables management), and we wait for it.
#   3. The base image is python:3.11-slim when it is available locally or can be
#      pulled; otherwise a local image (coding-gym-base:bookworm) is reused, or
#      built from a debootstrap'ed Debian bookworm root filesystem and imported,
#      which needs only the Debian package mirror.
#
# Settings (environment variables, all optional):
#   CODING_GYM_UPSTREAM_IMAGE  preferred base image     (python:3.11-slim)
#   CODING_GYM_LOCAL_IMAGE     locally built fallback   (coding-gym-base:bookworm)
#   CODING_GYM_DOCKERD_LOG     dockerd log file         (/var/log/coding-gym-dockerd.log)
#   CODING_GYM_DOCKERD_PIDFILE dockerd pid file         (/var/run/coding-gym-dockerd.pid)
#   CODING_GYM_DEBIAN_MIRROR   mirror for debootstrap   (http://deb.debian.org/debian)
#   CODING_GYM_PULL_TIMEOUT    seconds for docker pull  (30)
#   CODING_GYM_START_TIMEOUT   seconds to wait for dockerd (60)
set -euo pipefail

UPSTREAM_IMAGE="${CODING_GYM_UPSTREAM_IMAGE:-python:3.11-slim}"
LOCAL_IMAGE="${CODING_GYM_LOCAL_IMAGE:-coding-gym-base:bookworm}"
DOCKERD_LOG="${CODING_GYM_DOCKERD_LOG:-/var/log/coding-gym-dockerd.log}"
DOCKERD_PIDFILE="${CODING_GYM_DOCKERD_PIDFILE:-/var/run/coding-gym-dockerd.pid}"
DEBIAN_MIRROR="${CODING_GYM_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
DEBIAN_SUITE=bookworm
PULL_TIMEOUT="${CODING_GYM_PULL_TIMEOUT:-30}"
START_TIMEOUT="${CODING_GYM_START_TIMEOUT:-60}"
BOOTSTRAP_LOG=/var/log/coding-gym-debootstrap.log
APT_LOG=/var/log/coding-gym-apt.log
# Packages added to the minimal Debian root filesystem.  python-is-python3
# provides `python`, as in the official python images.
BOOTSTRAP_PACKAGES=python3,python3-venv,python3-pip,python-is-python3

PRINT_BASE=0
case "${1:-}" in
  "") ;;
  --print-base) PRINT_BASE=1 ;;
  -h | --help)
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
    ;;
  *)
    echo "docker-engine: unknown argument: $1 (try --help)" >&2
    exit 2
    ;;
esac

# did: an action that changed something.  In --print-base mode it goes to
# stderr so that stdout holds only the BASE_IMAGE line.
did() {
  if ((PRINT_BASE)); then
    echo "docker-engine: $*" >&2
  else
    echo "docker-engine: $*"
  fi
}

# noted: an observation that nothing needed doing; silent with --print-base.
noted() {
  if ((!PRINT_BASE)); then
    echo "docker-engine: $*"
  fi
}

die() {
  echo "docker-engine: error: $*" >&2
  exit 1
}

if [[ $(id -u) -ne 0 ]]; then
  # Without root we can still use an engine that is already up.
  if ! timeout 15 docker info >/dev/null 2>&1; then
    die "no usable Docker engine and not running as root; rerun as root"
  fi
fi

engine_answers() {
  command -v docker >/dev/null 2>&1 && timeout 15 docker info >/dev/null 2>&1
}

APT_UPDATED=0
# ensure_packages <command-to-check>:<package> ...
ensure_packages() {
  local spec cmd pkg missing=()
  for spec in "$@"; do
    cmd=${spec%%:*}
    pkg=${spec#*:}
    if ! command -v "$cmd" >/dev/null 2>&1 && [[ " ${missing[*]} " != *" $pkg "* ]]; then
      missing+=("$pkg")
    fi
  done
  ((${#missing[@]})) || return 0

  export DEBIAN_FRONTEND=noninteractive
  if ((!APT_UPDATED)); then
    if ! apt-get update -qq >>"$APT_LOG" 2>&1; then
      tail -n 50 "$APT_LOG" >&2 || true
      die "apt-get update failed (log: $APT_LOG)"
    fi
    APT_UPDATED=1
    did "refreshed apt package lists"
  fi
  # Keep package maintainer scripts from starting services themselves; the
  # daemon is started below with the options we need.
  local policy=/usr/sbin/policy-rc.d own_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    own_policy=1
  fi
  local rc=0
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >>"$APT_LOG" 2>&1 || rc=$?
  if ((own_policy)); then
    rm -f "$policy"
  fi
  if ((rc != 0)); then
    tail -n 50 "$APT_LOG" >&2 || true
    die "apt-get install ${missing[*]} failed (log: $APT_LOG)"
  fi
  did "installed Debian packages: ${missing[*]}"
}

pid_alive() {
  [[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null
}

# ---------------------------------------------------------------- engine ----
start_engine() {
  ensure_packages dockerd:docker.io docker:docker.io

  local pid=""
  if [[ -s $DOCKERD_PIDFILE ]]; then
    pid=$(<"$DOCKERD_PIDFILE")
  fi
  if pid_alive "$pid" && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == dockerd ]]; then
    noted "dockerd already started (pid $pid), waiting for it to answer"
  else
    mkdir -p "$(dirname "$DOCKERD_LOG")" "$(dirname "$DOCKERD_PIDFILE")"
    printf '\n=== %s starting dockerd\n' "$(date -u +%FT%TZ)" >>"$DOCKERD_LOG"
    # setsid + nohup: the daemon outlives this script and its terminal.
    setsid nohup dockerd \
      --storage-driver=overlay2 \
      --iptables=false \
      --ip6tables=false \
      --pidfile="$DOCKERD_PIDFILE" \
      >>"$DOCKERD_LOG" 2>&1 </dev/null &
    pid=$!
    did "started dockerd (pid $pid), log: $DOCKERD_LOG"
  fi

  local waited=0
  until engine_answers; do
    if ! pid_alive "$pid"; then
      # setsid may have forked; trust the pid file dockerd writes itself.
      local from_file=""
      [[ -s $DOCKERD_PIDFILE ]] && from_file=$(<"$DOCKERD_PIDFILE")
      if pid_alive "$from_file"; then
        pid=$from_file
      else
        echo "docker-engine: dockerd exited; last lines of $DOCKERD_LOG:" >&2
        tail -n 50 "$DOCKERD_LOG" >&2 || true
        exit 1
      fi
    fi
    if ((waited >= START_TIMEOUT)); then
      echo "docker-engine: dockerd did not answer within ${START_TIMEOUT}s;" \
        "last lines of $DOCKERD_LOG:" >&2
      tail -n 50 "$DOCKERD_LOG" >&2 || true
      exit 1
    fi
    sleep 1
    waited=$((waited + 1))
  done
  did "Docker engine answers after ${waited}s"
}

if engine_answers; then
  noted "Docker engine already answers (server $(docker version --format '{{.Server.Version}}' 2>/dev/null || echo '?'))"
else
  start_engine
fi

# ------------------------------------------------------------ base image ----
image_present() {
  docker image inspect "$1" >/dev/null 2>&1
}

# The imported image has no network needs; run it without a network so the
# check does not depend on how bridge networking is set up on this host.
image_runs() {
  [[ $(timeout 120 docker run --rm --network none "$1" python3 -c 'print(1)' 2>/dev/null) == 1 ]]
}

ROOTFS=""
cleanup_rootfs() {
  [[ -n $ROOTFS && -d $ROOTFS ]] || return 0
  # A failed debootstrap can leave /proc or /sys mounted inside the tree.
  local mnt
  while read -r mnt; do
    if [[ -n $mnt ]]; then
      umount -l "$mnt" 2>/dev/null || true
    fi
  done < <(findmnt -rn -o TARGET | grep -F "$ROOTFS/" | sort -r || true)
  rm -rf --one-file-system "$ROOTFS"
  ROOTFS=""
}

build_local_image() {
  # debootstrap checks the mirror's signatures with gpgv and Debian's keyring.
  ensure_packages debootstrap:debootstrap gpgv:gpgv
  if [[ ! -r /usr/share/keyrings/debian-archive-keyring.gpg ]]; then
    ensure_packages debian-archive-keyring-is-missing:debian-archive-keyring
  fi

  ROOTFS=$(mktemp -d /var/tmp/coding-gym-rootfs.XXXXXX)
  trap cleanup_rootfs EXIT
  did "bootstrapping Debian $DEBIAN_SUITE into $ROOTFS (log: $BOOTSTRAP_LOG)"
  if ! debootstrap --variant=minbase --include="$BOOTSTRAP_PACKAGES" \
    "$DEBIAN_SUITE" "$ROOTFS" "$DEBIAN_MIRROR" >"$BOOTSTRAP_LOG" 2>&1; then
    echo "docker-engine: debootstrap failed; last lines of $BOOTSTRAP_LOG:" >&2
    tail -n 50 "$BOOTSTRAP_LOG" >&2 || true
    exit 1
  fi

  # Trim the tree: package caches and lists are not needed in the image.
  rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb \
    "$ROOTFS"/var/cache/apt/*.bin \
    "$ROOTFS"/var/lib/apt/lists/* \
    "$ROOTFS"/var/log/* \
    "$ROOTFS"/tmp/* "$ROOTFS"/var/tmp/*
  # Let `pip install` work outside a virtualenv, as it does in the official
  # python images (Debian marks its interpreter as externally managed).
  rm -f "$ROOTFS"/usr/lib/python3*/EXTERNALLY-MANAGED

  tar -C "$ROOTFS" --numeric-owner --xattrs \
    --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' \
    -c . |
    docker import \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'ENV LANG=C.UTF-8' \
      --change 'ENV PYTHONUNBUFFERED=1' \
      --change 'CMD ["python3"]' \
      --message "Debian $DEBIAN_SUITE minbase with $BOOTSTRAP_PACKAGES" \
      - "$LOCAL_IMAGE" >/dev/null
  cleanup_rootfs
  trap - EXIT
  did "imported $LOCAL_IMAGE ($(docker image inspect --format '{{.Size}}' "$LOCAL_IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"

  if ! image_runs "$LOCAL_IMAGE"; then
    docker image rm "$LOCAL_IMAGE" >/dev/null 2>&1 || true
    die "$LOCAL_IMAGE does not run python3; image removed"
  fi
  did "checked that $LOCAL_IMAGE runs python3"
}

BASE_IMAGE=""
if image_present "$UPSTREAM_IMAGE"; then
  noted "$UPSTREAM_IMAGE is present locally"
  BASE_IMAGE=$UPSTREAM_IMAGE
elif timeout "$PULL_TIMEOUT" docker pull -q "$UPSTREAM_IMAGE" >/dev/null 2>&1; then
  did "pulled $UPSTREAM_IMAGE"
  BASE_IMAGE=$UPSTREAM_IMAGE
else
  noted "$UPSTREAM_IMAGE is not available locally and cannot be pulled"
  if image_present "$LOCAL_IMAGE"; then
    noted "reusing local image $LOCAL_IMAGE"
  else
    build_local_image
  fi
  BASE_IMAGE=$LOCAL_IMAGE
fi

echo "BASE_IMAGE=$BASE_IMAGE"
