"""``DockerBackend``: the episode's code runs in a Docker container serving coding-gym."""

from __future__ import annotations

import weakref
from typing import Any

from coding_gym.backends.remote import RemoteBackend
from coding_gym.containers import ContainerLease, ContainerSpec, ServerContainer, lease_container
from coding_gym.errors import BackendError, ServerError
from coding_gym.models import ExecResult, Limits

#: Image built from the project's Dockerfile by ``docker build -t coding-env:latest .``.
DEFAULT_IMAGE = "coding-env:latest"
#: How long a container that dropped a connection gets to show that it stopped: the engine
#: marks it exited a moment after the server's socket closes.
_DEATH_GRACE_S = 1.0


class _Attachment:
    """The container lease and the server session of one backend; released by close or GC."""

    def __init__(self) -> None:
        self.lease: ContainerLease | None = None
        self.remote: RemoteBackend | None = None

    def release(self) -> None:
        if self.remote is not None:
            self.remote.close()
            self.remote = None
        if self.lease is not None:
            self.lease.release()
            self.lease = None


class DockerBackend:
    """A :class:`RemoteBackend` to a server in a container that this backend starts.

    The container publishes its port on 127.0.0.1 only and gets a random token that only
    this process knows. Backends of one process with equal options share one container, each
    with its own server session: ``gymnasium.make_vec(..., backend="docker")`` starts one
    container, not N. The last backend to close removes it; so does interpreter exit for
    backends nobody closed.

    When the container dies, the step raises :class:`BackendError` with the container's last
    log lines (``CodingEnv`` truncates the episode and sets ``info["infra_error"]``), and the
    next :meth:`reset` starts a new container.

    Args:
        limits: Limits of every step; the container's server is started with them.
        image: Image to run; built from the project's Dockerfile.
        container_memory_mb: Memory limit of the whole container (all its sessions), or None.
        container_max_processes: Processes and threads the container may hold, or None.
        max_sessions: Sessions the container serves at once (backends sharing it).
        startup_timeout_s: How long the server may take to answer ``/health``.
        shared: Share the container with other backends of equal options in this process.

    Example:
        >>> env = gymnasium.make("CodingEnv-v0", backend="docker",
        ...                      image="coding-env:latest")  # doctest: +SKIP
    """

    def __init__(
        self,
        limits: Limits | None = None,
        *,
        image: str = DEFAULT_IMAGE,
        container_memory_mb: int | None = 4096,
        container_max_processes: int | None = 1024,
        max_sessions: int = 64,
        startup_timeout_s: float = 60.0,
        shared: bool = True,
    ) -> None:
        self.limits = limits or Limits()
        if isinstance(max_sessions, bool) or not isinstance(max_sessions, int) or max_sessions < 1:
            raise ValueError(f"Expected max_sessions to be a positive int, got {max_sessions!r}")
        self.spec = ContainerSpec(
            image=image,
            memory_mb=container_memory_mb,
            max_processes=container_max_processes,
            server_args=_server_args(self.limits, max_sessions),
        )
        self.startup_timeout_s = startup_timeout_s
        self.shared = shared
        self._attachment = _Attachment()
        self._closed = False
        # Release the session and the container even if the caller never closes.
        self._finalizer = weakref.finalize(self, self._attachment.release)
        self._attach()

    @property
    def container(self) -> ServerContainer | None:
        """The container this backend talks to (None between a death and the next reset)."""
        lease = self._attachment.lease
        return lease.container if lease is not None else None

    def reset(self) -> None:
        """Start a new episode in a new server session; a new container if the old one died."""
        self._check_open()
        if self._attachment.remote is None:
            self._attach()
        assert self._attachment.remote is not None
        try:
            self._attachment.remote.reset()
        except ServerError:
            raise
        except BackendError:
            if self._drop_dead_container() is None:
                raise
            self._attach()
            assert self._attachment.remote is not None
            self._attachment.remote.reset()

    def run(self, code: str, *, timeout_s: float | None = None) -> ExecResult:
        """Run ``code`` in the session's interpreter on the container's server."""
        self._check_open()
        state_lost = False
        if self._attachment.remote is None:
            # The last container died: this step runs in a new one, without the old variables.
            self.reset()
            state_lost = True
        assert self._attachment.remote is not None
        try:
            result = self._attachment.remote.run(code, timeout_s=timeout_s)
        except ServerError:
            raise  # the server answered, so it is alive
        except BackendError as e:
            death = self._drop_dead_container()
            if death is None:
                raise
            raise BackendError(f"{death}; the next reset starts a new container") from e
        result.state_lost = result.state_lost or state_lost
        return result

    def describe(self) -> dict[str, Any]:
        """What this backend is, which container it uses and where it sends code."""
        container = self.container
        return {
            "backend": "docker",
            "image": self.spec.image,
            "container": container.name if container is not None else None,
            "url": container.base_url if container is not None else None,
            "shared": self.shared,
            "limits": vars(self.limits).copy(),
        }

    def close(self) -> None:
        """End the server session and let go of the container (removed with its last user)."""
        self._closed = True
        self._finalizer()

    def _attach(self) -> None:
        self._attachment.release()
        lease = lease_container(self.spec, shared=self.shared,
                                startup_timeout_s=self.startup_timeout_s)
        self._attachment.lease = lease
        try:
            self._attachment.remote = RemoteBackend(
                self.limits, base_url=lease.container.base_url, token=lease.container.token
            )
        except BaseException:
            self._attachment.release()
            raise

    def _drop_dead_container(self) -> str | None:
        """If the container stopped: remove it, detach, and say what happened; else None."""
        lease = self._attachment.lease
        if lease is None:
            return None
        container = lease.container
        if not container.wait_stopped(_DEATH_GRACE_S):
            return None
        status, exit_code = container.status(), container.exit_code()
        death = (f"the server container {container.name} ({self.spec.image}) stopped "
                 f"({status}, exit code {exit_code}); last log lines:\n{container.logs_tail()}")
        if self._attachment.remote is not None:
            self._attachment.remote.close()
            self._attachment.remote = None
        self._attachment.lease = None
        lease.discard()
        return death

    def _check_open(self) -> None:
        if self._closed:
            raise BackendError("this DockerBackend is closed; create a new one")

    def __enter__(self) -> DockerBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _server_args(limits: Limits, max_sessions: int) -> tuple[str, ...]:
    """``coding-gym serve`` arguments that give the container's sessions these limits."""
    return ("--max-sessions", str(max_sessions), "--timeout-s", repr(limits.timeout_s),
            "--memory-mb", str(limits.memory_mb),
            "--max-output-bytes", str(limits.max_output_bytes))
