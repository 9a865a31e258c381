"""``RemoteBackend``: the episode's code runs on a server, reached over its ``/ws`` protocol.

The protocol is OpenEnv's coding_env protocol, so the server may be ``coding-gym serve`` or any
OpenEnv coding_env server. Our server adds an ``info`` dict beside each observation (timings,
truncation, kill reason, lost state); with a plain OpenEnv server those keys get defaults.
"""

from __future__ import annotations

import os
import time
import weakref
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from coding_gym import jsontext
from coding_gym.backends.websocket_client import BlockingWebSocket
from coding_gym.errors import BackendError, ServerError
from coding_gym.models import KILL_REASONS, ExecResult, Limits

#: Environment variable read when no ``token`` is given, by clients and ``coding-gym serve``.
TOKEN_ENV = "CODING_GYM_TOKEN"

#: Close code of a WebSocket the server refused for a missing or wrong token.
CLOSE_UNAUTHORIZED = 4401

#: Time allowed on top of a step's own limit for the server to kill, reap and answer.
_REPLY_MARGIN_S = 30.0
#: How long a reset may take: the server may have to start a fresh interpreter.
_RESET_TIMEOUT_S = 60.0


def websocket_url(base_url: str) -> str:
    """The ``/ws`` URL of a server given by its base URL (``http``, ``https``, ``ws``, ``wss``)."""
    parts = urlsplit(base_url if "://" in base_url else "http://" + base_url)
    schemes = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}
    if parts.scheme not in schemes or not parts.netloc:
        raise ValueError(
            f"Expected base_url like 'http://127.0.0.1:8000' (http, https, ws or wss), "
            f"got {base_url!r}"
        )
    path = parts.path.rstrip("/")
    if not path.endswith("/ws"):
        path += "/ws"
    return urlunsplit((schemes[parts.scheme], parts.netloc, path, parts.query, ""))


class ServerConnection:
    """One session with a server: a WebSocket that answers each request with one reply, in order.

    Every failure raises :class:`BackendError` with what went wrong and what to do; an error
    reply from the server raises :class:`ServerError`. After a failure that may have lost a
    reply (the connection dropped, a reply timed out) the connection is closed, since later
    replies could no longer be matched to their requests.

    Args:
        base_url: The server, for example ``"http://127.0.0.1:8000"``.
        token: Sent as ``Authorization: Bearer <token>``; defaults to ``$CODING_GYM_TOKEN``.
        connect_timeout_s: How long to wait for the connection to open.
        max_reply_bytes: Largest reply accepted.
    """

    def __init__(self, base_url: str, *, token: str | None = None,
                 connect_timeout_s: float = 10.0, max_reply_bytes: int = 64 << 20) -> None:
        self.url = websocket_url(base_url)
        self.token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        self.connect_timeout_s = connect_timeout_s
        self.max_reply_bytes = max_reply_bytes
        self._ws: BlockingWebSocket | None = None

    @property
    def connected(self) -> bool:
        """True while the WebSocket is open, as far as what the server sent so far says."""
        return self._ws is not None and self._ws.open

    def open(self) -> None:
        """Open the WebSocket, unless it is open already."""
        if self.connected:
            return
        self.close()
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        try:
            self._ws = BlockingWebSocket(self.url, headers=headers,
                                         open_timeout_s=self.connect_timeout_s,
                                         max_size=self.max_reply_bytes)
        except InvalidStatus as e:
            raise BackendError(
                f"the server at {self.url} refused the WebSocket connection with HTTP "
                f"{e.response.status_code}; is it a coding_gym or OpenEnv server?"
            ) from e
        except (OSError, TimeoutError, InvalidHandshake) as e:
            raise BackendError(
                f"could not connect to {self.url}: {e or type(e).__name__}. Is the server "
                "running? Start one with `coding-gym serve`."
            ) from e

    def request(self, message: dict[str, Any], *, timeout_s: float) -> dict[str, Any]:
        """Send ``message`` and return the ``data`` of the reply (observation or state),
        opening the WebSocket first if need be."""
        self.open()
        return self.exchange(message, timeout_s=timeout_s)

    def exchange(self, message: dict[str, Any], *, timeout_s: float) -> dict[str, Any]:
        """:meth:`request` over a WebSocket the caller just saw :attr:`connected`, without
        looking again (a look is a system call)."""
        assert self._ws is not None, "exchange() needs an open connection: use request()"
        try:
            self._ws.send(jsontext.dumps(message))
            raw = self._ws.recv(timeout_s)
        except TimeoutError as e:
            self.close()
            raise BackendError(
                f"no reply from {self.url} within {timeout_s:g} s; the connection was closed "
                "and the server ended the session"
            ) from e
        except ConnectionClosed as e:
            ws, self._ws = self._ws, None
            # A server that turns a connection away says why first (CAPACITY_REACHED),
            # possibly before this request was even sent.
            last_words = _buffered_message(ws)
            ws.close()
            if last_words is not None:
                self._reply_data(last_words)
            raise BackendError(self._closed_message(e)) from e
        except OSError as e:
            self.close()
            raise BackendError(f"lost the connection to {self.url}: {e}") from e
        return self._reply_data(raw)

    def _reply_data(self, raw: str | bytes) -> dict[str, Any]:
        try:
            reply = jsontext.loads(raw)
        except ValueError as e:
            self.close()
            raise BackendError(f"the server at {self.url} sent a reply that is not JSON") from e
        data = reply.get("data") if isinstance(reply, dict) else None
        if not isinstance(data, dict):
            self.close()
            raise BackendError(f"the server at {self.url} sent a reply without a data object")
        if reply.get("type") == "error":
            code = str(data.get("code", "UNKNOWN"))
            if code == "CAPACITY_REACHED":
                self.close()  # the server closes a connection it has no room for
            raise ServerError(str(data.get("message", "unknown error")), code)
        return data

    def _closed_message(self, e: ConnectionClosed) -> str:
        code = e.rcvd.code if e.rcvd is not None else None
        if code == CLOSE_UNAUTHORIZED:
            if self.token:
                return f"the server at {self.url} rejected the token (close code 4401)"
            return (f"the server at {self.url} requires a token (close code 4401): pass "
                    f"token=... or set ${TOKEN_ENV}")
        reason = f" ({e.rcvd.reason})" if e.rcvd is not None and e.rcvd.reason else ""
        return (f"the server at {self.url} closed the connection (code {code}){reason}; "
                "the session and its variables are gone")

    def close(self) -> None:
        """Say goodbye and close the WebSocket; safe to call twice."""
        ws, self._ws = self._ws, None
        if ws is None:
            return
        try:
            ws.send(jsontext.dumps({"type": "close"}))
        except (ConnectionClosed, OSError):
            pass
        ws.close()


def _buffered_message(ws: BlockingWebSocket) -> str | bytes | None:
    """A message received before the connection closed and not yet read, if any."""
    try:
        return ws.recv(0)
    except (ConnectionClosed, TimeoutError):
        return None


class RemoteBackend:
    """The Backend protocol over a server's ``/ws``: one server session per episode.

    Args:
        limits: The step timeout is sent with every step (our server caps it at its own
            limit); memory and output limits are the server's.
        base_url: The server, for example ``"http://127.0.0.1:8000"``.
        token: Sent as ``Authorization: Bearer <token>``; defaults to ``$CODING_GYM_TOKEN``.
        connect_timeout_s: How long to wait for the server to accept a connection.

    Server failures (unreachable, died, refused) raise :class:`BackendError` from
    :meth:`reset` and :meth:`run`; ``CodingEnv`` turns the latter into ``truncated=True``
    with ``info["infra_error"]``. The run after a lost connection opens a new session and
    says ``state_lost``.

    Example:
        >>> env = gymnasium.make("CodingEnv-v0", backend="remote",
        ...                      base_url="http://127.0.0.1:8000")  # doctest: +SKIP
    """

    def __init__(self, limits: Limits | None = None, *, base_url: str,
                 token: str | None = None, connect_timeout_s: float = 10.0) -> None:
        self.limits = limits or Limits()
        self._connection = ServerConnection(
            base_url, token=token, connect_timeout_s=connect_timeout_s,
            # Worst case: both streams full of bytes JSON escapes as \\u00XX; the server's
            # output limit may be larger than ours, hence the floor.
            max_reply_bytes=max(64 << 20, 12 * self.limits.max_output_bytes + (1 << 20)),
        )
        self._server_sends_info = False
        self._episode_started = False
        self._closed = False
        self._finalizer = weakref.finalize(self, self._connection.close)

    @property
    def url(self) -> str:
        """The server's WebSocket URL."""
        return self._connection.url

    @property
    def connected(self) -> bool:
        """True while the server session is open."""
        return self._connection.connected

    def reset(self) -> None:
        """End the server session's episode and start a new one (a new session if need be)."""
        self._check_open()
        data = self._connection.request({"type": "reset", "data": {}},
                                         timeout_s=_RESET_TIMEOUT_S)
        self._server_sends_info = isinstance(data.get("info"), dict)
        self._episode_started = True

    def run(self, code: str, *, timeout_s: float | None = None) -> ExecResult:
        """Run ``code`` in the server session's interpreter."""
        self._check_open()
        state_lost = False
        if not self._connection.connected:
            # A lost connection took the session and its variables with it.
            state_lost = self._episode_started
            self.reset()
        limit_s = self.limits.timeout_s if timeout_s is None else timeout_s
        message: dict[str, Any] = {"type": "step", "data": {"code": code}}
        if self._server_sends_info:
            # Only our server takes a timeout here; OpenEnv's refuses unknown keys.
            message["timeout_s"] = limit_s
        started = time.perf_counter()
        data = self._connection.exchange(message, timeout_s=limit_s + _REPLY_MARGIN_S)
        result = _exec_result(data, wall_time_s=time.perf_counter() - started, url=self.url)
        result.state_lost = result.state_lost or state_lost
        return result

    def describe(self) -> dict[str, Any]:
        """What this backend is and where it sends code."""
        return {"backend": "remote", "url": self.url, "limits": vars(self.limits).copy()}

    def _check_open(self) -> None:
        if self._closed:
            raise BackendError("this RemoteBackend is closed; create a new one")

    def close(self) -> None:
        """End the server session; safe to call twice."""
        self._closed = True
        self._finalizer()

    def __enter__(self) -> RemoteBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _exec_result(data: dict[str, Any], *, wall_time_s: float, url: str) -> ExecResult:
    """An ExecResult from an observation reply; ``wall_time_s`` is the round trip."""
    observation = data.get("observation")
    if not (isinstance(observation, dict) and isinstance(observation.get("stdout"), str)
            and isinstance(observation.get("stderr"), str)
            and type(observation.get("exit_code")) is int):
        raise BackendError(
            f"the server at {url} sent an observation without stdout, stderr and exit_code: "
            f"{str(observation)[:200]}"
        )
    info = data.get("info")
    info = info if isinstance(info, dict) else {}
    kill_reason = info.get("kill_reason")
    return ExecResult(
        stdout=observation["stdout"],
        stderr=observation["stderr"],
        # Observations are Discrete(256); some servers report negative codes.
        exit_code=observation["exit_code"] % 256,
        wall_time_s=_seconds(info.get("wall_time_s"), wall_time_s),
        cpu_time_s=_seconds(info.get("cpu_time_s"), 0.0),
        stdout_truncated=info.get("stdout_truncated") is True,
        stderr_truncated=info.get("stderr_truncated") is True,
        kill_reason=kill_reason if kill_reason in KILL_REASONS else None,
        state_lost=info.get("state_lost") is True,
    )


def _seconds(value: Any, default: float) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
    return float(value) if ok else default
