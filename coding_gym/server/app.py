"""``create_app()``: the routes of the server, which speaks OpenEnv's coding_env protocol.

Every route lives here; sessions, the WebSocket protocol and the protections are in their own
modules of this package.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypeVar

from fastapi import Body, Depends, FastAPI, Header, HTTPException, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from coding_gym import __version__
from coding_gym.backends.remote import CLOSE_UNAUTHORIZED
from coding_gym.errors import BackendError
from coding_gym.models import Limits
from coding_gym.openenv import CodeAction, CodeObservation, CodeState
from coding_gym.server import protocol, wsprotocol
from coding_gym.server.connection import Connection
from coding_gym.server.protocol import ResetRequest, StepRequest
from coding_gym.server.security import (
    CLOSE_FORBIDDEN,
    UNAUTHORIZED_DETAIL,
    BodySizeLimit,
    BrowserHeaders,
    browser_refusal,
    token_matches,
)
from coding_gym.server.session import Session, new_episode_id, reset_reply
from coding_gym.server.sessions import CapacityReached, SessionManager

T = TypeVar("T")

DESCRIPTION = ("Run Python code, step by step, in one persistent sandboxed interpreter per "
               "session. Speaks OpenEnv's coding_env protocol over HTTP and WebSocket (/ws).")

#: Header naming the HTTP session a request belongs to (see ``POST /sessions``).
SESSION_HEADER = "X-Session-Id"

SessionId = Annotated[str | None, Header(alias=SESSION_HEADER)]


class _ClientGone(Exception):
    """The HTTP client disconnected before its step finished."""


def create_app(*, limits: Limits | None = None, max_sessions: int = 64,
               idle_timeout_s: float = 600.0, token: str | None = None,
               any_host: bool = False, max_message_bytes: int = 1 << 20,
               start_ahead: int = 1) -> FastAPI:
    """The coding_gym server as an ASGI application.

    Args:
        limits: Limits of every session's interpreter. Clients may ask for a shorter step
            timeout, never a longer one.
        max_sessions: Sessions alive at once; each holds one interpreter. WebSocket
            connections, HTTP sessions and stateless HTTP steps all count.
        idle_timeout_s: Sessions without a request for this long are closed.
        token: When set, every route that runs code or touches a session needs
            ``Authorization: Bearer <token>`` (WebSockets may pass ``?token=``). Without
            one, those routes answer only requests addressed to a loopback name
            (``Host``), and browsers only from the server's own page (``Origin``).
        any_host: Without a token, answer requests whatever their ``Host``: for a server
            bound beyond loopback on purpose (``coding-gym serve --insecure``).
        max_message_bytes: Largest HTTP request body and WebSocket message accepted.
        start_ahead: Interpreters kept started, beyond ``max_sessions``, for the next new
            sessions and resets: those then wait for none (see ``server/ahead.py``).

    Serve it with uvicorn (``coding-gym serve`` does), with ``ws_max_size`` above
    ``max_message_bytes`` so that oversized messages get an error reply.
    """
    manager = SessionManager(limits or Limits(), max_sessions, idle_timeout_s, start_ahead)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        manager.start()
        try:
            yield
        finally:
            await manager.shutdown()

    app = FastAPI(title="coding_gym", version=__version__, description=DESCRIPTION,
                  lifespan=lifespan)
    app.state.sessions = manager
    app.state.max_message_bytes = max_message_bytes
    app.add_middleware(BodySizeLimit, max_bytes=max_message_bytes)
    app.add_middleware(BrowserHeaders, prefix="/web")

    async def admit(request: Request) -> None:
        if token is not None:
            if not token_matches(token, request.headers):
                raise HTTPException(401, UNAUTHORIZED_DETAIL,
                                    headers={"WWW-Authenticate": "Bearer"})
            return
        refusal = browser_refusal(request.headers, any_host=any_host)
        if refusal is not None:
            raise HTTPException(403, refusal)

    guarded = [Depends(admit)]

    async def open_session() -> Session:
        try:
            return await manager.open()
        except CapacityReached as e:
            raise HTTPException(503, str(e), headers={"Retry-After": "1"}) from e

    def find_session(session_id: str) -> Session:
        session = manager.get(session_id)
        if session is None:
            raise HTTPException(
                404, f"no session {session_id!r}: it was closed, expired after "
                f"{idle_timeout_s:g} s without requests, or never existed. Create one with "
                "POST /sessions.")
        return session

    async def run(call: Awaitable[T]) -> T:
        try:
            return await call
        except BackendError as e:
            raise HTTPException(500, f"the server could not run the request: {e}") from e

    # Descriptive routes: open to all, they run nothing.

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        # Relative, so that it still works behind a proxy that adds a path prefix.
        return RedirectResponse("web/")

    @app.get("/health", tags=["Info"])
    async def health() -> dict[str, str]:
        """Liveness: 200 while the server runs."""
        return {"status": "healthy"}

    @app.get("/metadata", tags=["Info"])
    async def metadata() -> dict[str, Any]:
        """Name, description and version of the environment, and the limits of a session."""
        return {
            "name": "coding_gym",
            "description": DESCRIPTION,
            "version": __version__,
            "readme_content": None,
            "author": None,
            "documentation_url": None,
            "limits": vars(manager.limits).copy(),
            "token_required": token is not None,
        }

    @app.get("/schema", tags=["Info"])
    async def schema() -> dict[str, Any]:
        """JSON schemas of the action, the observation and the state."""
        return {
            "action": CodeAction.model_json_schema(),
            "observation": CodeObservation.model_json_schema(),
            "state": CodeState.model_json_schema(),
        }

    # OpenEnv's routes: stateless unless the request names a session with X-Session-Id.

    @app.post("/reset", dependencies=guarded, tags=["Environment"])
    async def reset(body: Annotated[ResetRequest, Body(default_factory=ResetRequest)],
                    session_id: SessionId = None) -> dict[str, Any]:
        """Start an episode. Without a session this only returns the first observation."""
        if session_id is None:
            return reset_reply(body.episode_id or new_episode_id(body.seed))
        session = find_session(session_id)
        return await run(manager.reset(session, body.seed, body.episode_id))

    @app.post("/step", dependencies=guarded, tags=["Environment"])
    async def step(request: Request, body: StepRequest,
                   session_id: SessionId = None) -> Any:
        """Run ``action.code``: in a fresh interpreter, or in the session's."""
        if session_id is not None:
            session = find_session(session_id)
            return await run(manager.step(session, body.action.code, body.timeout_s))
        session = await open_session()
        try:
            call = manager.step(session, body.action.code, body.timeout_s)
            return await run(_unless_disconnected(request, manager, session, call))
        except _ClientGone:
            return Response(status_code=499)
        finally:
            manager.close_soon(session)  # the reply need not wait for it; its slot does

    @app.get("/state", dependencies=guarded, tags=["Environment"])
    async def state(session_id: SessionId = None) -> dict[str, Any]:
        """The session's episode id, step count and last exit code."""
        if session_id is None:
            return {"episode_id": None, "step_count": 0, "last_exit_code": None}
        return find_session(session_id).state()

    # HTTP sessions: state across requests without a WebSocket.

    @app.post("/sessions", status_code=201, dependencies=guarded, tags=["Sessions"])
    async def create_session(body: Annotated[ResetRequest, Body(default_factory=ResetRequest)]
                             ) -> dict[str, Any]:
        """Open a session and start its first episode; send its id as X-Session-Id."""
        session = await open_session()
        try:
            reply = await run(manager.reset(session, body.seed, body.episode_id))
        except BaseException:
            await manager.close(session)
            raise
        return {"session_id": session.id, **reply}

    @app.get("/sessions", dependencies=guarded, tags=["Sessions"])
    async def sessions() -> dict[str, Any]:
        """How many sessions are open, how many may be, and how many interpreters are
        started ahead for the next."""
        return {"active": manager.active, "max_sessions": manager.max_sessions,
                "idle_timeout_s": manager.idle_timeout_s,
                "ready_ahead": manager.ready_ahead}

    @app.delete("/sessions/{session_id}", status_code=204, dependencies=guarded,
                tags=["Sessions"])
    async def delete_session(session_id: str) -> Response:
        """Close a session now: its interpreter is killed, even mid-step."""
        session = find_session(session_id)
        await manager.interrupt(session)
        await manager.close(session)
        return Response(status_code=204)

    @app.post("/mcp", dependencies=guarded, tags=["Environment"])
    async def mcp(request: Request) -> JSONResponse:
        """JSON-RPC 2.0 endpoint of OpenEnv's MCP mode; this environment has no tools."""
        return JSONResponse(_mcp_reply(await request.body()))

    async def websocket(scope: Scope, receive: Receive, send: Send) -> None:
        ws = WebSocket(scope, receive, send)
        await ws.accept()
        if token is not None and not token_matches(token, ws.headers, ws.query_params):
            await ws.close(code=CLOSE_UNAUTHORIZED, reason="missing or wrong token")
            return
        refusal = None if token is not None else browser_refusal(ws.headers,
                                                                 any_host=any_host)
        if refusal is not None:
            await ws.send_text(json.dumps(protocol.error_reply(refusal, protocol.FORBIDDEN)))
            await ws.close(code=CLOSE_FORBIDDEN, reason="forbidden origin or host")
            return
        try:
            session = await manager.open()
        except CapacityReached as e:
            await ws.send_text(json.dumps(protocol.error_reply(
                str(e), protocol.CAPACITY_REACHED, active_sessions=manager.active,
                max_sessions=manager.max_sessions)))
            await ws.close(code=1013, reason="server at capacity")
            return
        # After the handshake, messages bypass the WebSocket wrapper (see connection.py).
        await Connection(receive, send, session, manager, max_message_bytes,
                         scope.get("extensions", {}).get(wsprotocol.EXTENSION)).serve()

    # Outermost: Starlette's exception handling and FastAPI's own layers would otherwise wrap
    # every message of every session (see WebSocketAtPath).
    app.add_middleware(WebSocketAtPath, path="/ws", handler=websocket)
    app.mount("/web", StaticFiles(packages=[("coding_gym.server", "web")], html=True),
              name="web")
    return app


class WebSocketAtPath:
    """Serve WebSocket connections to ``path`` with ``handler``, ahead of the app's routing.

    Through the route, Starlette's exception handling and FastAPI's middleware wrapped the
    ``receive`` and ``send`` of every message in five more calls; the handler gets the
    server's own. Everything else goes to the app.
    """

    def __init__(self, app: ASGIApp, path: str, handler: ASGIApp) -> None:
        self.app = app
        self.path = path
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope["path"] == self.path:
            await self.handler(scope, receive, send)
        else:
            await self.app(scope, receive, send)


async def _unless_disconnected(request: Request, manager: SessionManager, session: Session,
                               call: Awaitable[T]) -> T:
    """Await ``call``; if the client disconnects first, kill the step and raise _ClientGone."""
    work = asyncio.ensure_future(call)
    watch = asyncio.ensure_future(_disconnect(request))
    await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    if work.done():
        watch.cancel()
        return work.result()
    await manager.interrupt(session)
    try:
        await work
    except Exception:
        pass  # its client is gone: nobody to tell
    raise _ClientGone


async def _disconnect(request: Request) -> None:
    """Return when the client of ``request`` (whose body was read) disconnects."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _mcp_reply(body: bytes) -> dict[str, Any]:
    """JSON-RPC error replies: parse error, invalid request, or no such method."""
    try:
        message = json.loads(body)
    except ValueError:
        return _rpc_error(None, -32700, "Parse error: the body is not JSON")
    if not (isinstance(message, dict) and message.get("jsonrpc") == "2.0"
            and isinstance(message.get("method"), str)):
        return _rpc_error(None, -32600, "Invalid Request: expected a JSON-RPC 2.0 object "
                                        "with a method")
    return _rpc_error(message.get("id"), -32601,
                      f"Method not found: {message['method']!r}. This environment has no MCP "
                      "tools; run code with POST /step or over the /ws WebSocket.")


def _rpc_error(request_id: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}
