"""The one HTTP client of the CLI verbs that talk to a running daemon (stdlib only: the verbs run
where the service's venv may not be active): JSON calls and a multipart upload, with the token."""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
import uuid
from typing import Any, Optional

from configs import Config
from gateway.security import TokenUnreadable, read_token

__all__ = ["DaemonClient", "TokenUnreadable", "daemon_auth"]


def daemon_auth(cfg: Config) -> dict[str, str]:
    """The Authorization header every verb that talks to the daemon sends: the token from
    gateway.auth_token, $POSE_SERVICE_TOKEN or gateway.auth_token_file (none: no header)."""
    token = read_token(cfg)
    return {"Authorization": f"Bearer {token}"} if token else {}


class DaemonClient:
    """Calls to the gateway at `base` (http://host:port); an HTTP error is an answer, not an exception."""

    def __init__(self, base: str, headers: Optional[dict[str, str]] = None, timeout_s: float = 15.0):
        self.base, self.headers, self.timeout_s = base.rstrip("/"), headers or {}, timeout_s

    @classmethod
    def for_config(cls, cfg, url: Optional[str] = None) -> "DaemonClient":
        """The configured gateway (or `url`) with the configured token. Raises TokenUnreadable."""
        return cls(url or f"http://{cfg.gateway.host}:{cfg.gateway.port}", daemon_auth(cfg))

    def call(self, method: str, path: str, body: Optional[dict] = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        return self.send(method, path, data, {"Content-Type": "application/json"})

    def upload(self, path: str, video: str, field: str = "video") -> tuple[int, Any]:
        """multipart/form-data POST of one file."""
        boundary = uuid.uuid4().hex
        with open(video, "rb") as fh:
            payload = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; "
                       f"filename=\"{os.path.basename(video)}\"\r\nContent-Type: video/mp4\r\n\r\n").encode() \
                + fh.read() + f"\r\n--{boundary}--\r\n".encode()
        return self.send("POST", path, payload, {"Content-Type": f"multipart/form-data; boundary={boundary}"}, 30.0)

    def send(self, method: str, path: str, data: Optional[bytes], headers: dict[str, str],
             timeout_s: Optional[float] = None) -> tuple[int, Any]:
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={**headers, **self.headers})
        try:
            with urllib.request.urlopen(request, timeout=timeout_s or self.timeout_s) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")
