"""Server containers: a coding-gym server in Docker, started and removed by this process.

Every container publishes the server's port on 127.0.0.1 only, on a port Docker picks, and
gets a random token that only this process knows, so nobody else on the host can run code
through it. Containers carry their owner in labels (host name and pid) and are removed:

- when the last :class:`ContainerLease` on them is released (``close()`` of the user);
- at interpreter exit, for leases nobody released;
- by the next process on this host that starts one, when their owner died without running
  its exit handlers (SIGKILL, power loss).

Equal :class:`ContainerSpec` share one container when asked to (a vector env's sessions).
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from coding_gym.backends.remote import TOKEN_ENV
from coding_gym.errors import BackendError, ContainerStartError
from coding_gym.sandbox.processes import pid_alive

logger = logging.getLogger(__name__)

#: Port the server listens on inside the image (the Dockerfile's EXPOSE).
CONTAINER_PORT = 8000
#: Labels naming the process that owns a container.
OWNER_PID_LABEL = "coding-gym.owner-pid"
OWNER_HOST_LABEL = "coding-gym.owner-host"
#: What the server in a container keeps of root: switching each episode's worker to its own
#: uid (SETUID, SETGID, CHOWN for its directory), killing those workers (KILL) and removing
#: the files they leave (DAC_OVERRIDE).
SERVER_CAPABILITIES = ("SETUID", "SETGID", "CHOWN", "KILL", "DAC_OVERRIDE")
_LOG_LINES = 40


@dataclass(frozen=True)
class ContainerSpec:
    """What a server container is started from.

    Attributes:
        image: Image that serves coding-gym on port 8000 (built from the project's
            Dockerfile, for example ``coding-env:latest``).
        memory_mb: Memory limit of the whole container (server and every session), or
            ``None`` for no limit.
        max_processes: Processes and threads the whole container may hold, or ``None``.
        server_args: Arguments appended to the image's command (the image's entrypoint is
            ``coding-gym serve``), for example ``("--max-sessions", "8")``.
    """

    image: str
    memory_mb: int | None = 4096
    max_processes: int | None = 1024
    server_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.image, str) or not self.image:
            raise ValueError(f"Expected image to be a non-empty str, got {self.image!r}")
        for name in ("memory_mb", "max_processes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value <= 0):
                raise ValueError(f"Expected {name} to be a positive int or None, got {value!r}")


class ServerContainer:
    """A started container running the coding-gym server; use it through a lease."""

    def __init__(self, container: Any, spec: ContainerSpec, token: str) -> None:
        self._container = container
        self.spec = spec
        self.token = token
        self.base_url = ""
        self.leases = 0
        self._removed = False

    @property
    def id(self) -> str:
        return str(self._container.id)

    @property
    def name(self) -> str:
        return str(self._container.name)

    def status(self) -> str:
        """Docker's state of the container (``"running"``, ``"exited"`` ...) or ``"removed"``."""
        if self._removed:
            return "removed"
        try:
            self._container.reload()
        except Exception:  # gone, or the engine went away: either way it serves nobody
            return "removed"
        return str(self._container.status)

    def exit_code(self) -> int | None:
        """Exit code of a stopped container, None while it runs or once removed."""
        if self.status() in ("running", "created", "removed"):
            return None
        return int(self._container.attrs["State"]["ExitCode"])

    def host_port(self) -> str | None:
        """The host port published for the server's port, as of the last status check."""
        ports = self._container.attrs["NetworkSettings"]["Ports"] or {}
        bindings = ports.get(f"{CONTAINER_PORT}/tcp") or []
        return str(bindings[0]["HostPort"]) if bindings else None

    def logs_tail(self, lines: int = _LOG_LINES) -> str:
        """The container's last output lines (stdout and stderr), for error messages."""
        try:
            raw = self._container.logs(tail=lines)
        except Exception as e:
            return f"(logs unavailable: {e})"
        text: str = raw.decode("utf-8", errors="replace").rstrip()
        return text or "(no output)"

    def wait_stopped(self, timeout_s: float) -> bool:
        """Whether the container is (or within ``timeout_s`` becomes) not running."""
        deadline = time.monotonic() + timeout_s
        while self.status() == "running":
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def remove(self) -> None:
        """Kill and remove the container; safe to call twice and after the engine stopped it."""
        if self._removed:
            return
        self._removed = True
        _started.pop(self.id, None)
        try:
            self._container.remove(force=True)
        except Exception as e:
            if type(e).__name__ != "NotFound":
                logger.warning("could not remove container %s: %s", self.name, e)

    def __repr__(self) -> str:
        return f"<ServerContainer {self.name} {self.spec.image} {self.base_url}>"


class ContainerLease:
    """One user's hold on a server container; the last release removes the container."""

    def __init__(self, container: ServerContainer) -> None:
        self.container = container
        self._pid = os.getpid()
        self._released = False

    def release(self) -> None:
        """Let go of the container; safe to call twice."""
        # A forked child holds copies of its parent's leases: they are not its to release.
        if self._released or os.getpid() != self._pid:
            return
        self._released = True
        with _lock:
            self.container.leases -= 1
            if self.container.leases > 0:
                return
            if _shared.get(self.container.spec) is self.container:
                del _shared[self.container.spec]
        self.container.remove()

    def discard(self) -> None:
        """The container died: remove it now, so new leases start another, and release."""
        with _lock:
            if _shared.get(self.container.spec) is self.container:
                del _shared[self.container.spec]
        self.container.remove()
        self.release()


def lease_container(
    spec: ContainerSpec, *, shared: bool = True, startup_timeout_s: float = 60.0
) -> ContainerLease:
    """A lease on a healthy server container for ``spec``, started if needed.

    With ``shared``, leases of equal specs in this process share one container (each user
    gets its own session on the server). Raises :class:`ContainerStartError`, with the
    container's last log lines, when it exits or does not answer ``/health`` in time.
    """
    with _lock:
        container = _shared.get(spec) if shared else None
        if container is not None and container.status() != "running":
            del _shared[spec]
            container = None
        if container is None:
            container = _start(spec, startup_timeout_s)
            if shared:
                _shared[spec] = container
        container.leases += 1
        return ContainerLease(container)


def docker_client() -> Any:
    """This process's Docker client (from ``DOCKER_HOST`` and friends, like the CLI)."""
    global _client, _client_pid
    if _client is None or _client_pid != os.getpid():
        try:
            import docker
        except ImportError as e:
            raise ImportError(
                "The docker backend needs the Docker SDK: pip install 'coding-gym[docker]'"
            ) from e
        try:
            _client = docker.from_env()
            _client.ping()
        except Exception as e:
            raise BackendError(
                f"Cannot reach a Docker engine ({e}). Start one (on this project's dev machines: "
                f"scripts/docker-engine.sh) or point DOCKER_HOST at it."
            ) from e
        _client_pid = os.getpid()
    return _client


def remove_orphans() -> list[str]:
    """Remove containers of this host whose owning process is gone; their names."""
    client = docker_client()
    removed = []
    for container in client.containers.list(
        all=True, filters={"label": f"{OWNER_HOST_LABEL}={socket.gethostname()}"}
    ):
        pid = container.labels.get(OWNER_PID_LABEL, "")
        if pid.isdigit() and not pid_alive(int(pid)):
            try:
                container.remove(force=True)
                removed.append(container.name)
            except Exception as e:
                logger.warning("could not remove orphaned container %s: %s", container.name, e)
    if removed:
        logger.info("removed containers of processes that are gone: %s", ", ".join(removed))
    return removed


def _start(spec: ContainerSpec, startup_timeout_s: float) -> ServerContainer:
    global _orphans_checked
    client = docker_client()
    if not _orphans_checked:
        remove_orphans()
        _orphans_checked = True
    import docker.errors

    token = secrets.token_urlsafe(32)
    options: dict[str, Any] = {
        "detach": True,
        "name": f"coding-gym-{os.getpid()}-{secrets.token_hex(4)}",
        "environment": {TOKEN_ENV: token},
        # Loopback only, on a port the engine picks: nothing outside this host can connect.
        "ports": {f"{CONTAINER_PORT}/tcp": ("127.0.0.1", None)},
        "labels": {OWNER_PID_LABEL: str(os.getpid()), OWNER_HOST_LABEL: socket.gethostname()},
        # Root inside, with only the capabilities that give each episode a uid of its own
        # (and let the server signal and clean up after it): sessions sharing the container
        # cannot signal, trace or read each other's workers. The image's default user
        # would put every episode under one uid. Workers keep none of these.
        "user": "0",
        "cap_drop": ["ALL"],
        "cap_add": list(SERVER_CAPABILITIES),
        "security_opt": ["no-new-privileges"],
        # Agent code may write to its episode's directory under /tmp, never to the image: the
        # server's own files stay intact whatever a session does. The tmpfs counts against
        # the container's memory limit.
        "read_only": True,
        "tmpfs": {"/tmp": "rw,nosuid,nodev"},
    }
    if spec.server_args:
        options["command"] = list(spec.server_args)
    if spec.memory_mb is not None:
        options["mem_limit"] = f"{spec.memory_mb}m"
        # Equal to mem_limit: no swap on top of the limit.
        options["memswap_limit"] = f"{spec.memory_mb}m"
    if spec.max_processes is not None:
        options["pids_limit"] = spec.max_processes
    try:
        created = client.containers.create(spec.image, **options)
    except docker.errors.ImageNotFound as e:
        raise ContainerStartError(
            f"Image {spec.image!r} is not on this Docker engine. Build it from the project's "
            f"Dockerfile (docker build -t {spec.image} .) or pull it (docker pull {spec.image})."
        ) from e
    except docker.errors.DockerException as e:
        raise ContainerStartError(f"Could not create a container from {spec.image!r}: {e}") from e
    container = ServerContainer(created, spec, token)
    _started[container.id] = container
    try:
        created.start()
        container.base_url = _published_url(container)
        _wait_healthy(container, startup_timeout_s)
    except BaseException:
        container.remove()
        raise
    logger.info("started %r", container)
    return container


def _published_url(container: ServerContainer) -> str:
    status = container.status()
    if status != "running":
        raise _stopped_early(container, status)
    port = container.host_port()
    if port is None:
        raise ContainerStartError(
            f"Docker published no host port for port {CONTAINER_PORT} of {container.name}; "
            f"does {container.spec.image!r} expose it?"
        )
    return f"http://127.0.0.1:{port}"


def _stopped_early(container: ServerContainer, status: str) -> ContainerStartError:
    return ContainerStartError(
        f"Container {container.name} from {container.spec.image!r} stopped before its server "
        f"was ready ({status}, exit code {container.exit_code()}). Last log lines:\n"
        f"{container.logs_tail()}"
    )


def _wait_healthy(container: ServerContainer, timeout_s: float) -> None:
    """Poll ``/health`` until it answers 200; fail early when the container stops."""
    import httpx

    deadline = time.monotonic() + timeout_s
    headers = {"Authorization": f"Bearer {container.token}"}
    delay_s = 0.02
    last_problem = "no answer yet"
    while True:
        try:
            response = httpx.get(f"{container.base_url}/health", headers=headers, timeout=2.0)
            if response.status_code == 200:
                return
            last_problem = f"/health answered {response.status_code}"
        except httpx.HTTPError as e:
            last_problem = f"{type(e).__name__}: {e}"
        status = container.status()
        if status != "running":
            raise _stopped_early(container, status)
        if time.monotonic() >= deadline:
            raise ContainerStartError(
                f"Container {container.name} from {container.spec.image!r} did not answer "
                f"{container.base_url}/health within {timeout_s:g} s ({last_problem}). Last log "
                f"lines:\n{container.logs_tail()}"
            )
        time.sleep(delay_s)
        delay_s = min(delay_s * 1.5, 0.25)


def _remove_started() -> None:
    """At exit: remove every container this process started and nobody removed."""
    for container in list(_started.values()):
        container.remove()


def _forget_after_fork() -> None:
    # The child owns none of its parent's containers; it starts its own when it needs one.
    global _client, _lock, _orphans_checked
    _lock = threading.RLock()
    _shared.clear()
    _started.clear()
    _client = None
    _orphans_checked = False


_lock = threading.RLock()
_shared: dict[ContainerSpec, ServerContainer] = {}
_started: dict[str, ServerContainer] = {}
_client: Any = None
_client_pid = 0
_orphans_checked = False

atexit.register(_remove_started)
os.register_at_fork(after_in_child=_forget_after_fork)
