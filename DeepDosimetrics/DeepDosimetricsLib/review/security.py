"""Who may talk to the review station: bind address, access token, and the gate in front of every request.

- The station binds to 127.0.0.1 unless ``--host`` says otherwise. Any other host requires an access token:
  ``--token T`` or one generated with :mod:`secrets` and printed with the URL.
- The gate is an aiohttp middleware on the trame (wslink) web server, so it runs before every HTTP handler:
  the page, its scripts and the websocket upgrade that carries the views and the state. A request without
  the token, or with a wrong one, gets 403 and a one-line body, no data. The token is accepted as
  ``?token=`` (the printed URL; the answer then sets an HttpOnly, SameSite=Strict cookie so the page's
  scripts and websocket carry it), as that cookie, or as ``Authorization: Bearer``.
- Always (token or not): the Host header must name the bound address when it is a loopback one (a web page
  elsewhere cannot reach the station through DNS rebinding), and a websocket's Origin must be the station
  itself (another site open in the browser cannot drive it).
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from dataclasses import dataclass, field
from typing import Optional
from urllib.parse import urlsplit

from DeepDosimetricsLib.runtime.errors import InputError

DEFAULT_HOST = "127.0.0.1"
COOKIE = "deepdosimetrics_review_token"
TOKEN_BYTES = 24
_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is only reachable from this machine."""
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def generate_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


@dataclass(frozen=True)
class AccessPolicy:
    """The bind address and the token (None: no token asked, only on a loopback address)."""

    host: str = DEFAULT_HOST
    token: Optional[str] = field(default=None, repr=False)
    generated: bool = False

    @classmethod
    def create(cls, host: Optional[str] = None, token: Optional[str] = None) -> AccessPolicy:
        """The policy of ``--host``/``--token``: a token is generated for a non-loopback host without one."""
        host = (host or DEFAULT_HOST).strip()
        if not host or any(ch.isspace() or ch in "/?#@" for ch in host):
            raise InputError(f"--host {host!r} is not a host name or address")
        if token is not None:
            token = token.strip()
            if len(token) < 16 or not token.isprintable() or any(ch.isspace() or ch in ";," for ch in token):
                raise InputError("--token must be at least 16 printable characters without spaces, ',' or ';'")
            return cls(host, token, False)
        if is_loopback(host):
            return cls(host, None, False)
        return cls(host, generate_token(), True)

    @property
    def requires_token(self) -> bool:
        return self.token is not None

    def url(self, port: int, path: str = "index.html") -> str:
        """The URL a browser opens (with ``?token=`` when one is needed)."""
        shown = self.host
        if shown in ("0.0.0.0", "::", ""):
            import socket

            shown = socket.gethostname()
        if ":" in shown and not shown.startswith("["):
            shown = f"[{shown}]"
        query = f"?token={self.token}" if self.token else ""
        return f"http://{shown}:{port}/{path}{query}"

    # ------------------------------------------------------------------ checks
    def token_matches(self, candidate: Optional[str]) -> bool:
        if self.token is None:
            return True
        if not candidate:
            return False
        return hmac.compare_digest(candidate.encode("utf-8", "replace"), self.token.encode("utf-8"))

    def host_allowed(self, host_header: Optional[str]) -> bool:
        """A loopback bind answers only requests addressed to a loopback name (no DNS rebinding)."""
        if not is_loopback(self.host):
            return True
        if not host_header:
            return False
        name = urlsplit(f"//{host_header}").hostname or ""
        return name in _LOOPBACK_NAMES or name == self.host

    @staticmethod
    def origin_allowed(origin: Optional[str], host_header: Optional[str]) -> bool:
        """A websocket opened by a page must come from the station's own origin."""
        if origin is None:  # not a browser page (a script): the token and the host rule still apply
            return True
        parts = urlsplit(origin)
        return bool(host_header) and parts.scheme in ("http", "https") and parts.netloc == host_header


def request_token(request) -> tuple[Optional[str], bool]:
    """(token offered, whether it came in the query string) of an aiohttp request."""
    query = request.query.get("token")
    if query:
        return query, True
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        return header[len("Bearer "):].strip(), False
    return request.cookies.get(COOKIE), False


def make_middleware(policy: AccessPolicy):
    """The aiohttp middleware enforcing ``policy`` on every request (page, assets, websocket)."""
    from aiohttp import web

    def refuse(reason: str):
        return web.Response(status=403, text=f"403 forbidden: {reason}\n",
                            headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})

    @web.middleware
    async def gate(request, handler):
        host = request.headers.get("Host")
        if not policy.host_allowed(host):
            return refuse("this station answers only on its own address")
        if request.headers.get("Upgrade", "").lower() == "websocket" and not policy.origin_allowed(
            request.headers.get("Origin"), host
        ):
            return refuse("cross-site websocket")
        offered, from_query = request_token(request)
        if not policy.token_matches(offered):
            return refuse("access token missing or wrong")
        response = await handler(request)
        headers = getattr(response, "headers", None)
        if headers is not None and not getattr(response, "prepared", False):
            headers.setdefault("X-Content-Type-Options", "nosniff")
            headers.setdefault("Referrer-Policy", "no-referrer")
            headers.setdefault("X-Frame-Options", "DENY")
            if policy.requires_token and from_query:
                response.set_cookie(COOKIE, policy.token, httponly=True, samesite="Strict", path="/")
        return response

    return gate


def install(server, policy: AccessPolicy) -> None:
    """Put the gate in front of the trame server's web application when it is created (before it starts)."""
    middleware = make_middleware(policy)

    def bind(ws_server, *args, **kwargs):
        app = getattr(ws_server, "app", None)
        if app is None:
            raise RuntimeError("the trame backend exposes no aiohttp application: refusing to serve unguarded")
        app.middlewares.append(middleware)

    server.controller.on_server_bind.add(bind)
