"""OpenEnv-style client and models: code written for OpenEnv's coding_env runs against us.

    >>> from coding_gym.openenv import CodeAction, CodingEnv
    >>> with CodingEnv(base_url="http://127.0.0.1:8000") as env:  # doctest: +SKIP
    ...     result = env.reset()
    ...     result = env.step(CodeAction(code="x = 6 * 7"))
    ...     result = env.step(CodeAction(code="print(x)"))
    ...     result.observation.stdout
    '42\\n'

The models are the wire protocol's, shared with the server: the server validates requests
with :class:`CodeAction` and publishes these schemas at ``GET /schema``. Like OpenEnv's, an
observation holds exactly ``stdout``, ``stderr`` and ``exit_code``; our server sends its extra
facts (timings, truncation, kill reason, lost state) beside it, in :attr:`StepResult.info`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from coding_gym.backends.remote import ServerConnection
from coding_gym.errors import BackendError

__all__ = ["CodeAction", "CodeObservation", "CodeState", "CodingEnv", "StepResult"]

#: Time allowed on top of the step's own limit for the server to answer.
_REPLY_MARGIN_S = 30.0


class CodeAction(BaseModel):
    """One step: Python source to run in the episode's interpreter."""

    model_config = ConfigDict(extra="forbid")

    code: str = Field(description="Python source to run; globals persist between steps")
    metadata: dict[str, Any] = Field(
        default_factory=dict,
        description="Free-form data about the action; accepted for OpenEnv compatibility "
                    "and ignored",
    )


class CodeObservation(BaseModel):
    """What one step printed and how it ended."""

    model_config = ConfigDict(extra="forbid")

    stdout: str = Field(description="Standard output of the step")
    stderr: str = Field(description="Standard error of the step, with the traceback if any")
    exit_code: int = Field(description="0 success, 1 exception, n for SystemExit(n), "
                                       "128+N when killed by signal N")


class CodeState(BaseModel):
    """Where the session's episode stands."""

    model_config = ConfigDict(extra="allow")

    episode_id: str | None = Field(default=None, description="Identifier of the episode")
    step_count: int = Field(default=0, ge=0, description="Steps taken in the episode")
    last_exit_code: int | None = Field(default=None,
                                       description="Exit code of the last step, if any")


@dataclass
class StepResult:
    """What :meth:`CodingEnv.reset` and :meth:`CodingEnv.step` return."""

    observation: CodeObservation
    reward: float | None = None
    done: bool = False
    #: Our server's extras (``wall_time_s``, ``kill_reason``, ``state_lost``, ...); empty
    #: when the server is a plain OpenEnv one.
    info: dict[str, Any] = field(default_factory=dict)


class CodingEnv:
    """A session on a coding_gym or OpenEnv coding_env server, with OpenEnv's client API.

    Args:
        base_url: The server, for example ``"http://127.0.0.1:8000"``.
        token: Sent as ``Authorization: Bearer <token>``; defaults to ``$CODING_GYM_TOKEN``.
        connect_timeout_s: How long to wait for the connection to open.
        message_timeout_s: How long to wait for any reply; a step given ``timeout_s`` waits
            for that plus a margin instead.

    Failures raise :class:`coding_gym.errors.BackendError`; an error reply from the server
    raises its subclass :class:`coding_gym.errors.ServerError`, whose ``code`` says which
    kind. :meth:`close` ends the session and leaves the server running, unless the client
    started the server itself with :meth:`from_docker_image`.
    """

    def __init__(self, base_url: str, *, token: str | None = None,
                 connect_timeout_s: float = 10.0, message_timeout_s: float = 60.0) -> None:
        self._connection = ServerConnection(base_url, token=token,
                                            connect_timeout_s=connect_timeout_s)
        self.message_timeout_s = message_timeout_s
        # Set by from_docker_image: removes the container this client started.
        self._release_container: weakref.finalize | None = None

    @classmethod
    def from_docker_image(cls, image: str, *, memory_mb: int | None = 4096,
                          max_processes: int | None = 1024, startup_timeout_s: float = 60.0,
                          **options: Any) -> CodingEnv:
        """Start a container from ``image``, wait for its server, and connect to it.

        The container publishes its port on 127.0.0.1 only and its server requires a random
        token that only this client knows. :meth:`close` removes the container; so does
        interpreter exit if the client is never closed.

        Args:
            image: An image built from the project's Dockerfile, e.g. ``"coding-env:latest"``.
            memory_mb: Memory limit of the container, or None.
            max_processes: Processes and threads the container may hold, or None.
            startup_timeout_s: How long the server may take to answer ``/health``; after
                that, or if the container exits, :class:`coding_gym.errors.ContainerStartError`
                is raised with its last log lines.
            **options: Passed to the constructor (``connect_timeout_s``,
                ``message_timeout_s``).
        """
        from coding_gym.containers import ContainerSpec, lease_container

        spec = ContainerSpec(image, memory_mb=memory_mb, max_processes=max_processes)
        lease = lease_container(spec, shared=False, startup_timeout_s=startup_timeout_s)
        try:
            client = cls(lease.container.base_url, token=lease.container.token, **options)
        except BaseException:
            lease.release()
            raise
        client._release_container = weakref.finalize(client, lease.release)
        return client

    @property
    def url(self) -> str:
        """The server's WebSocket URL."""
        return self._connection.url

    def reset(self, *, seed: int | None = None, episode_id: str | None = None) -> StepResult:
        """Start a new episode: a fresh interpreter with empty globals."""
        data: dict[str, Any] = {}
        if seed is not None:
            data["seed"] = seed
        if episode_id is not None:
            data["episode_id"] = episode_id
        reply = self._connection.request({"type": "reset", "data": data},
                                         timeout_s=self.message_timeout_s)
        return _step_result(reply)

    def step(self, action: CodeAction, *, timeout_s: float | None = None) -> StepResult:
        """Run ``action.code``; ``timeout_s`` (our server only) shortens the step's limit."""
        if not isinstance(action, CodeAction):
            raise TypeError(
                f"Expected a CodeAction, got {type(action).__name__}. "
                "Wrap the source: CodeAction(code=...)"
            )
        message: dict[str, Any] = {"type": "step", "data": action.model_dump()}
        wait_s = self.message_timeout_s
        if timeout_s is not None:
            message["timeout_s"] = timeout_s
            wait_s = timeout_s + _REPLY_MARGIN_S
        return _step_result(self._connection.request(message, timeout_s=wait_s))

    def state(self) -> CodeState:
        """The episode id, the number of steps taken and the last exit code."""
        reply = self._connection.request({"type": "state"}, timeout_s=self.message_timeout_s)
        try:
            return CodeState(**reply)
        except ValidationError as e:
            raise BackendError(f"the server sent an invalid state: {e}") from e

    def close(self) -> None:
        """End the session; safe to call twice. The server keeps running, unless this client
        started it with :meth:`from_docker_image`: then its container is removed."""
        self._connection.close()
        if self._release_container is not None:
            self._release_container()

    def __enter__(self) -> CodingEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _step_result(reply: dict[str, Any]) -> StepResult:
    info = reply.get("info")
    try:
        observation = CodeObservation(**reply.get("observation", {}))
    except (TypeError, ValidationError) as e:
        raise BackendError(f"the server sent an invalid observation: {e}") from e
    return StepResult(
        observation=observation,
        reward=reply.get("reward"),
        done=bool(reply.get("done", False)),
        info=info if isinstance(info, dict) else {},
    )
