"""Who may talk to the gateway.

- A web page the user visits must not drive or read the service: requests whose `Host` is not a
  configured name, a loopback name or an IP literal are refused (DNS rebinding gives a page's own
  host name to 127.0.0.1), and a request carrying an `Origin` that is not allowed is refused on every
  state-changing method (a cross-site form POST). The Node backend sends no Origin. CORS headers are
  sent only for the origins configured in `gateway.allowed_origins`.
- With `gateway.auth_token` (or the environment variable, or the file), every route but the
  liveness ones needs `Authorization: Bearer <token>`, compared as bytes in constant time. A token
  is visible ASCII (what a header carries unchanged); any other credentials, whatever bytes the
  header holds, are a 401, and a configured token that is blank or not visible ASCII refuses to start."""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
from typing import Optional

from aiohttp import web

from configs import Config
from gateway.errors import ApiError, json_error

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
OPEN_ROUTES = frozenset({"/health", "/v1/health"})  # liveness, for probes that carry no token
TOKEN_ENV = "POSE_SERVICE_TOKEN"
CORS_METHODS = "GET, POST, DELETE, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type, Idempotency-Key, Last-Event-ID"
TOKEN_SHAPE = re.compile(r"[\x21-\x7e]+")  # visible ASCII, no spaces: survives any header encoding


def host_name(host_header: str) -> str:
    """`Host` without its port (`[::1]:5000` -> `::1`, `example:80` -> `example`)."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def host_allowed(host_header: Optional[str], allowed: list[str]) -> bool:
    """A rebinding attack needs a host *name* it controls; IP literals and loopback names are safe."""
    if "*" in allowed:
        return True
    if not host_header:
        return False
    name = host_name(host_header)
    return name in LOOPBACK_NAMES or is_ip_literal(name) or name in {h.lower() for h in allowed}


class TokenUnreadable(ValueError):
    """The configured token cannot be used: its file is unreadable or empty, or it is blank or malformed."""


def read_token(cfg: Config) -> Optional[str]:
    """gateway.auth_token, else $POSE_SERVICE_TOKEN, else the first line of gateway.auth_token_file.
    A value that is set but blank is refused (it would admit nobody, or look like a lock that is not
    there); an empty environment variable counts as unset, as shells use it."""
    if cfg.gateway.auth_token is not None:
        return checked_token(cfg.gateway.auth_token, "gateway.auth_token")
    if os.environ.get(TOKEN_ENV):
        return checked_token(os.environ[TOKEN_ENV], f"${TOKEN_ENV}")
    if not cfg.gateway.auth_token_file:
        return None
    path = os.path.expanduser(cfg.gateway.auth_token_file)
    try:
        with open(path) as fh:
            token = fh.readline().strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not text"
        raise TokenUnreadable(f"gateway.auth_token_file={path} cannot be read ({reason})") from None
    if not token:
        raise TokenUnreadable(f"gateway.auth_token_file={path} is empty")
    return checked_token(token, f"gateway.auth_token_file={path}")


def checked_token(token: str, source: str) -> str:
    token = str(token).strip()
    if not token:
        raise TokenUnreadable(f"{source} is blank: set a real token or leave it unset")
    if not TOKEN_SHAPE.fullmatch(token):
        raise TokenUnreadable(f"{source} must be visible ASCII characters without spaces "
                              "(e.g. the output of `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    return token


def bearer_matches(header: Optional[str], token: str) -> bool:
    """`Bearer <token>`, compared as bytes in constant time (digests, so the length is not told
    either). Whatever else the header holds, undecodable bytes included, is simply no match."""
    scheme, _, given = (header or "").strip(" \t").partition(" ")
    given = given.strip(" \t")
    if scheme.lower() != "bearer" or not TOKEN_SHAPE.fullmatch(given):
        return False
    return hmac.compare_digest(hashlib.sha256(given.encode("ascii")).digest(),
                               hashlib.sha256(token.encode("ascii")).digest())


def guard(cfg: Config, token: Optional[str]):
    """The middleware: Host, then Origin, then the token; CORS headers for an allowed web origin
    (on errors too, so its page can read why)."""
    allowed_hosts = list(cfg.gateway.allowed_hosts)
    allowed_origins = {o.rstrip("/").lower() for o in cfg.gateway.allowed_origins}

    @web.middleware
    async def check(request: web.Request, handler):
        check_host(request, allowed_hosts)
        origin = request.headers.get("Origin")
        web_origin = origin if origin is not None and origin_allowed(origin, request, allowed_origins) else None
        if origin is not None and web_origin is None and request.method not in SAFE_METHODS:
            raise json_error(403, "requests from a web page of another origin are refused "
                                  "(add it to gateway.allowed_origins)", code="origin_not_allowed")
        if request.method == "OPTIONS" and web_origin:
            return web.Response(status=204, headers=cors_headers(web_origin, preflight=True))
        try:
            check_token(request, token)
            response = await handler(request)
        except ApiError as exc:
            exc.headers.update(cors_headers(web_origin) if web_origin else {})
            raise
        response.headers.update(cors_headers(web_origin) if web_origin else {})
        return response

    return check


def check_host(request: web.Request, allowed_hosts: list[str]) -> None:
    if not host_allowed(request.headers.get("Host"), allowed_hosts):
        raise json_error(403, "this Host is not served here (add it to gateway.allowed_hosts)",
                         code="host_not_allowed")


def check_token(request: web.Request, token: Optional[str]) -> None:
    if token and request.path not in OPEN_ROUTES and not bearer_matches(request.headers.get("Authorization"), token):
        raise json_error(401, "authentication required: Authorization: Bearer <gateway.auth_token>",
                         headers={"WWW-Authenticate": 'Bearer realm="pose-service"'}, code="unauthorized")


def origin_allowed(origin: str, request: web.Request, allowed: set[str]) -> bool:
    """A configured origin, or the service's own pages (same origin: the Host was checked first).
    Only a visible-ASCII origin is echoed back in a response header."""
    if not TOKEN_SHAPE.fullmatch(origin):
        return False
    origin = origin.rstrip("/").lower()
    return origin in allowed or origin == f"{request.scheme}://{request.host}".lower()


def cors_headers(origin: str, preflight: bool = False) -> dict[str, str]:
    headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
    if preflight:
        headers.update({"Access-Control-Allow-Methods": CORS_METHODS, "Access-Control-Allow-Headers": CORS_HEADERS,
                        "Access-Control-Max-Age": "600"})
    return headers


def is_loopback(host: str) -> bool:
    name = host_name(host) if host else ""
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def startup_refusal(cfg: Config, served_host: str) -> Optional[str]:
    """Why the gateway must not start, in one line: an unreadable token file, or an address reachable
    from other machines with no token (that would hand the service to the network)."""
    try:
        token = read_token(cfg)
    except TokenUnreadable as exc:
        return str(exc)
    if token or is_loopback(served_host):
        return None
    return (f"it would listen on {served_host}, reachable from other machines, without a token: set "
            f"gateway.auth_token (or ${TOKEN_ENV}, or gateway.auth_token_file), or listen on 127.0.0.1")
