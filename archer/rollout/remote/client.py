"""One HTTP call to a vLLM server, and the errors every failure becomes.

Only the standard library talks HTTP, through :data:`archer.rollout.server.OPENER` (direct
connections: an ``http_proxy`` in the environment is ignored). JSON in and out. Every call has a
timeout, chosen by the caller (:class:`~archer.rollout.remote.fleet.ServerFleet` picks the
engine's ``request_timeout_s``, ``sync_timeout_s`` or ``startup_timeout_s``). Nothing is retried
here: a call that timed out may still take effect on the server.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import urllib.error
import urllib.request
from typing import Any

from archer.rollout.server import OPENER

__all__ = ["RemoteServerError", "RemoteServerTimeout", "request"]


class RemoteServerError(RuntimeError):
    """A vLLM server answered with an error, was unreachable, or returned something unexpected."""

    def __init__(self, url: str, message: str, status: int | None = None) -> None:
        super().__init__(f"vLLM server {url}: {message}")
        self.url = url
        self.detail = message
        self.status = status


class RemoteServerTimeout(RemoteServerError, TimeoutError):
    """A vLLM server did not answer in time."""


def request(url: str, method: str, path: str, body: Any = None, timeout: float = 60.0) -> Any:
    """One HTTP call to a server; JSON in and out. Every failure becomes a :class:`RemoteServerError`
    naming the server (``RemoteServerTimeout`` when no answer came within ``timeout`` seconds).
    Never retried here: a call that timed out may still take effect on the server."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    http_request = urllib.request.Request(url + path, data=data, method=method, headers=headers)
    what = f"{method} {path.split('?')[0]}"
    try:
        with OPENER.open(http_request, timeout=timeout) as response:  # direct: no env proxy
            raw = response.read()
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            parsed = json.loads(detail)
            detail = (parsed.get("error") or {}).get("message") or parsed.get("detail") or detail
        raise RemoteServerError(url, f"{what} answered HTTP {err.code}: {str(detail)[:1500]}", status=err.code) from err
    except urllib.error.URLError as err:
        if isinstance(err.reason, TimeoutError):
            raise RemoteServerTimeout(url, f"{what}: no answer within {timeout:g} s") from err
        raise RemoteServerError(url, f"{what} failed: {err.reason} (is the server running?)") from err
    except TimeoutError as err:
        raise RemoteServerTimeout(url, f"{what}: no answer within {timeout:g} s") from err
    except (OSError, http.client.HTTPException) as err:
        raise RemoteServerError(url, f"{what} failed: {type(err).__name__}: {err}") from err
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError as err:
        raise RemoteServerError(url, f"{what} returned non-JSON: {raw[:200]!r}") from err
