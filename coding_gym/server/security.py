"""Protections of the service: the bearer token, request size limits, browser headers.

Without a token, a server on loopback still refuses two browser attacks: a page of another
site opening a WebSocket to it (browsers let any page do that; the ``Origin`` header tells),
and DNS rebinding, where another site's name resolves to 127.0.0.1 (the ``Host`` header
tells).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from collections.abc import Mapping
from urllib.parse import urlsplit

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Close code of a WebSocket refused for its Origin or Host (HTTP 403's twin).
CLOSE_FORBIDDEN = 4403

UNAUTHORIZED_DETAIL = ("missing or wrong token: send the header 'Authorization: Bearer "
                       "<token>' (WebSocket clients may use the query parameter ?token=<token>)")


def token_matches(expected: str | None, headers: Mapping[str, str],
                  query: Mapping[str, str] | None = None) -> bool:
    """True when no token is required, or the request carries it.

    The token comes as ``Authorization: Bearer <token>``, or for WebSockets (browsers cannot
    set their headers) as the ``token`` query parameter.
    """
    if expected is None:
        return True
    scheme, _, given = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        given = (query or {}).get("token", "")
    # Constant time: the comparison must not reveal how much of a guess was right.
    return hmac.compare_digest(given.strip().encode(), expected.encode())


def is_loopback(host: str) -> bool:
    """True for names of this machine only: localhost, 127.0.0.0/8, ::1."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _hostname(host_header: str) -> str:
    return urlsplit(f"//{host_header}").hostname or ""


def browser_refusal(headers: Mapping[str, str], *, any_host: bool) -> str | None:
    """Why a request to a server without a token is refused, or None to let it through.

    ``any_host`` lifts the loopback ``Host`` rule, for a server bound beyond loopback on
    purpose; a WebSocket opened by another site's page is refused either way.
    """
    host = headers.get("host", "")
    if not any_host and not is_loopback(_hostname(host)):
        return (f"this server has no token, so it only answers requests addressed to "
                f"localhost or a loopback address, not {host!r}; start it with a token to "
                "serve other names")
    origin = headers.get("origin")
    if origin is not None and urlsplit(origin).netloc.lower() != host.lower():
        return (f"a page from {origin} may not use this server: it has no token, so only "
                "its own web UI may connect from a browser")
    return None


class _TooLarge(HTTPException):
    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"request body exceeds the server's limit of {max_bytes} bytes")


class BodySizeLimit:
    """Refuse HTTP request bodies over ``max_bytes`` with 413, declared or streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await _send_json(send, 413, {"detail": _TooLarge(self.max_bytes).detail})
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # An HTTPException: FastAPI passes it through body parsing as a 413.
                    raise _TooLarge(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)


class BrowserHeaders:
    """Headers that keep the web UI's page from being framed, sniffed or leaking its URL."""

    def __init__(self, app: ASGIApp, prefix: str) -> None:
        self.app = app
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + [
                    (b"content-security-policy",
                     b"default-src 'self'; img-src 'self' data:; connect-src 'self'; "
                     b"frame-ancestors 'none'; base-uri 'none'; form-action 'self'"),
                    (b"x-content-type-options", b"nosniff"),
                    # The page URL may carry ?token=...: never send it to another site.
                    (b"referrer-policy", b"no-referrer"),
                    (b"cache-control", b"no-cache"),
                ]
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def _send_json(send: Send, status: int, body: dict[str, object]) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
