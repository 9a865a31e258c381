"""The coding_gym server: the environment over HTTP and WebSocket, OpenEnv-compatible.

``create_app()`` builds the ASGI application; ``coding-gym serve`` runs it with uvicorn.
"""

from __future__ import annotations

from coding_gym.server.app import create_app

__all__ = ["create_app"]
