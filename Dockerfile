# The coding-gym server: CodingEnv-v0 over HTTP/WebSocket on port 8000, web UI at /web.
#
#   docker build -t coding-env:latest .
#   docker run --rm -p 127.0.0.1:8000:8000 -e CODING_GYM_TOKEN=change-me coding-env:latest
#   docker run --rm -p 8000:8000 coding-env:latest --insecure     # trusted network only
#
# Clients send the token as "Authorization: Bearer <token>". Arguments after the image name
# go to `coding-gym serve` (for example --max-sessions 32, or --insecure to serve without a
# token).
#
# Offline builds (no index reachable from inside the build): put a wheel of every
# dependency in build/wheels/ and pip installs from there only; scripts/build-image.sh does
# that with the host's pip. BASE_IMAGE may be any Debian-like image with python3 (3.11+) and
# its venv module.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Dependencies first, from pyproject.toml alone, so editing the source reuses this layer.
# "build/wheels*" matches nothing in a plain checkout, and then only pyproject.toml is copied.
COPY pyproject.toml build/wheels* /tmp/deps/
RUN set -eu; \
    if ls /tmp/deps/*.whl >/dev/null 2>&1; then export PIP_NO_INDEX=1 PIP_FIND_LINKS=/tmp/deps; fi; \
    python3 -m venv /opt/venv; \
    python3 -c 'import sys, tomllib; p = tomllib.load(open(sys.argv[1], "rb"))["project"]; print("\n".join(p["dependencies"] + p["optional-dependencies"]["server"]))' \
        /tmp/deps/pyproject.toml >/tmp/requirements.txt; \
    /opt/venv/bin/pip install -r /tmp/requirements.txt
# The package itself, built as a wheel here so the final stage needs no build tools.
COPY pyproject.toml README.md /src/
COPY coding_gym /src/coding_gym
RUN set -eu; \
    if ls /tmp/deps/*.whl >/dev/null 2>&1; then export PIP_NO_INDEX=1 PIP_FIND_LINKS=/tmp/deps; fi; \
    /opt/venv/bin/pip wheel --no-deps --wheel-dir /tmp/dist /src

FROM ${BASE_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# uid 1000: the uid Hugging Face Spaces runs containers as, so files and HOME line up there.
RUN useradd --create-home --home-dir /home/coding-gym --uid 1000 --user-group \
        --shell /usr/sbin/nologin coding-gym
COPY --from=build /opt/venv /opt/venv
COPY --from=build /tmp/dist/ /tmp/dist/
RUN pip install --no-deps --no-index /tmp/dist/*.whl && rm -rf /tmp/dist

USER coding-gym
WORKDIR /home/coding-gym
EXPOSE 8000
# Standard library only: the image needs no curl.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"]
ENTRYPOINT ["coding-gym", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD []
